//! The README tells the truth: its tables are the code's tables and its
//! commands run.

use std::process::Command;

use outpost_shared::ErrorCode;
use outpost_shared::validate::Limits;
use outpost_tests::{fenced_block_after, outpost_bin, readme, section};

fn error_table() -> String {
    let mut t = String::from("| code | HTTP | name | meaning |\n| --- | --- | --- | --- |\n");
    for c in ErrorCode::ALL {
        t.push_str(&format!(
            "| {} | {} | `{}` | {} |\n",
            c.code(),
            c.http_status(),
            c.name(),
            c.message()
        ));
    }
    t.trim_end().to_owned()
}

#[test]
fn readme_error_table_is_the_code_table() {
    let expected = error_table();
    assert!(
        section(&readme(), "error-codes") == expected,
        "README error table is stale; replace it with:\n\n{expected}\n"
    );
}

#[test]
fn readme_limits_are_the_defaults() {
    let doc = section(&readme(), "limits");
    let limits = serde_json::to_value(Limits::default()).unwrap();
    for (key, value) in limits.as_object().unwrap() {
        let row = doc
            .lines()
            .find(|l| l.contains(&format!("`{key}`")))
            .unwrap_or_else(|| panic!("README limits table lacks {key}"));
        assert!(
            row.contains(&format!("| {value} |")),
            "README says {row:?} but the default of {key} is {value}"
        );
    }
}

#[test]
fn readme_quick_start_run_command_works() {
    let block = fenced_block_after(&readme(), "quick-start-run");
    let cmd = block.lines().next().unwrap();
    let prefix = "cargo run -q --bin outpost --";
    assert!(cmd.starts_with(prefix), "quick start changed shape: {cmd}");
    // Same command, with the binary scripts/test already built.
    let script = cmd.replacen(prefix, &outpost_bin().display().to_string(), 1);
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(outpost_tests::repo_root())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(answer["accepted"], 1, "{answer}");
    assert_eq!(answer["rejected"], 1, "{answer}");
    assert_eq!(answer["errors"][0]["code"], 40005, "{answer}");
}

#[test]
fn readme_sign_command_prints_the_vector_signature() {
    let block = fenced_block_after(&readme(), "example: cli-signing");
    let cmd = block.lines().next().unwrap();
    let script = cmd.replacen(
        "cargo run -q --bin outpost --",
        &outpost_bin().display().to_string(),
        1,
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected_output = block
        .lines()
        .skip_while(|l| !l.starts_with("X-Outpost-Key"))
        .collect::<Vec<_>>()
        .join("\n");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        expected_output.trim()
    );
}
