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
fn readme_quick_start_runs_outpost_dev_through_scripts_dev() {
    // tests/dev.rs runs `outpost dev` and every command it prints; this
    // pins the quick start to the script that starts it.
    let block = fenced_block_after(&readme(), "quick-start-run");
    assert_eq!(block.trim(), "./scripts/dev");
    let script = std::fs::read_to_string(outpost_tests::repo_root().join("scripts/dev")).unwrap();
    assert!(script.contains("./scripts/build-edge spin"), "{script}");
    assert!(script.contains("/debug/outpost\" dev"), "{script}");
}

#[test]
fn readme_validate_example_works() {
    let block = fenced_block_after(&readme(), "example: validate");
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
    let out = outpost_tests::run_ok(Command::new("bash").arg("-c").arg(&script));
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

/// Every leaf of the default configuration as (dotted key, default as TOML).
fn config_leaves() -> Vec<(String, String)> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => out.push((prefix.to_owned(), other.to_string())),
        }
    }
    let value = toml::Value::try_from(outpost_aggregator::config::Config::default()).unwrap();
    let mut out = Vec::new();
    walk("", &value, &mut out);
    out.retain(|(k, _)| k != "edge_keys");
    out
}

#[test]
fn readme_documents_every_config_key_with_its_default_and_env_name() {
    let doc = section(&readme(), "config");
    let mut missing = Vec::new();
    for (key, default) in config_leaves() {
        let env = format!("OUTPOST_{}", key.replace('.', "_").to_ascii_uppercase());
        let row = doc.lines().find(|l| l.starts_with(&format!("| `{key}` |")));
        match row {
            Some(r) if r.contains(&format!("`{default}`")) && r.contains(&format!("`{env}`")) => {}
            _ => missing.push(format!("| `{key}` | `{default}` | `{env}` | … |")),
        }
    }
    assert!(
        missing.is_empty(),
        "README config table lacks or misstates:\n{}",
        missing.join("\n")
    );
}

#[test]
fn readme_example_config_loads() {
    let example = fenced_block_after(&readme(), "example: aggregator-config");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outpost.toml");
    std::fs::write(&path, example).unwrap();
    let config =
        outpost_aggregator::config::Config::load(Some(&path)).expect("README example config");
    assert_eq!(
        config.edge_keys.len(),
        2,
        "the example shows a key rotation"
    );
}

#[test]
fn readme_fleet_example_config_loads_as_a_jetstream_fleet() {
    use outpost_aggregator::spool::Backend;
    let example = fenced_block_after(&readme(), "example: fleet-config");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outpost.toml");
    std::fs::write(&path, example).unwrap();
    let config =
        outpost_aggregator::config::Config::load(Some(&path)).expect("README fleet config");
    assert_eq!(config.spool.backend, Backend::Jetstream);
    assert_eq!(config.spool.jetstream.urls.len(), 3);
    assert_eq!(config.spool.jetstream.replicas, 3);
    assert!(!config.read_api.cursor_secret.0.is_empty());
}

fn edge_variable_table() -> String {
    let mut t = String::from("| variable | default | meaning |\n| --- | --- | --- |\n");
    for (name, default, meaning) in outpost_edge::config::VARIABLES {
        let default = match default {
            None => "required".to_owned(),
            Some("") => "(empty)".to_owned(),
            Some(d) => format!("`{d}`"),
        };
        t.push_str(&format!("| `{name}` | {default} | {meaning} |\n"));
    }
    t.trim_end().to_owned()
}

#[test]
fn readme_edge_variables_are_the_code_table() {
    let expected = edge_variable_table();
    assert!(
        section(&readme(), "edge-variables") == expected,
        "README edge variable table is stale; replace it with:\n\n{expected}\n"
    );
}

#[test]
fn spin_and_wrangler_manifests_name_every_edge_variable() {
    let root = outpost_tests::repo_root();
    let spin: toml::Table = std::fs::read_to_string(root.join("spin.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let wrangler_text = std::fs::read_to_string(root.join("wrangler.toml")).unwrap();
    let wrangler: toml::Table = wrangler_text.parse().unwrap();
    let component = &spin["component"]["outpost-edge"];
    for (name, default, _) in outpost_edge::config::VARIABLES {
        let declared = spin["variables"]
            .get(*name)
            .unwrap_or_else(|| panic!("spin.toml [variables] lacks {name}"));
        assert_eq!(
            component["variables"][*name].as_str(),
            Some(format!("{{{{ {name} }}}}").as_str()),
            "spin.toml does not pass {name} to the component"
        );
        let upper = name.to_ascii_uppercase();
        match default {
            // Required settings with no safe default are secrets.
            None if *name == "edge_key_secret" => {
                assert_eq!(declared["secret"].as_bool(), Some(true));
                assert!(
                    wrangler["vars"].get(&upper).is_none(),
                    "{upper} must be a secret"
                );
                assert!(wrangler_text.contains(&format!("wrangler secret put {upper}")));
            }
            _ => assert!(
                wrangler["vars"].get(&upper).is_some(),
                "wrangler.toml [vars] lacks {upper}"
            ),
        }
    }
    assert_eq!(wrangler["main"].as_str(), Some("build/index.js"));
    assert_eq!(wrangler["build"]["command"].as_str(), Some(""));
    assert_eq!(
        wrangler["kv_namespaces"][0]["binding"].as_str(),
        Some("OUTPOST_KV")
    );
    assert_eq!(
        component["source"].as_str(),
        Some("target/wasm32-wasip2/wasm/outpost_edge_spin.wasm")
    );
}

#[test]
fn readme_edge_host_example_is_a_valid_config_with_the_real_defaults() {
    let block = fenced_block_after(&readme(), "example: edge.toml");
    let cfg: outpost_edge_host::HostConfig = toml::from_str(&block).unwrap();
    assert_eq!(cfg.listen.port(), 3000);
    assert_eq!(cfg.limits, outpost_edge_host::Limits::default());
    assert!(matches!(cfg.kv, outpost_edge_host::KvConfig::Redis { .. }));
}
