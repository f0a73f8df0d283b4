//! `OUTPOST_*` environment overrides on arbitrary names and values: each
//! input line is `NAME=VALUE` (the prefix added); loading a configuration
//! from them either works or fails with an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let vars: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (format!("OUTPOST_{k}"), v.to_owned()))
        .collect();
    if let Ok(config) = outpost_aggregator::config::Config::load_with_env(None, vars.into_iter()) {
        let _ = config.check();
    }
});
