//! The README's configuration table and `--help` name the same variables
//! with the same defaults (both come from one table in the code; the README
//! is written by hand, so this keeps it honest).

use std::collections::BTreeMap;
use std::process::Command;

/// `name -> default` from the README's table (`| variable | default | ... |`).
fn readme_settings() -> BTreeMap<String, String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md is readable");
    let mut rows = BTreeMap::new();
    let mut in_table = false;
    for line in readme.lines() {
        if line.starts_with("| variable | default |") {
            in_table = true;
            continue;
        }
        if !in_table || line.starts_with("|---") {
            continue;
        }
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = match cells[1] {
            "PROXY_TARGET1, PROXY_TARGET2, PROXY_TARGET3" => "PROXY_TARGETn",
            other => other,
        };
        rows.insert(name.to_string(), cells[2].to_string());
    }
    rows
}

/// `name -> default` from the variables listed by `proxy-channel --help`.
fn help_settings() -> BTreeMap<String, String> {
    let output = Command::new(env!("CARGO_BIN_EXE_proxy-channel"))
        .arg("--help")
        .output()
        .expect("proxy-channel --help runs");
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).expect("help is UTF-8");
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let name = words.next()?;
            let is_variable = name.starts_with("PROXY_") || name == "RUST_LOG";
            let default = words.next()?;
            is_variable.then(|| (name.to_string(), default.to_string()))
        })
        .collect()
}

#[test]
fn readme_table_and_help_list_the_same_variables_and_defaults() {
    let readme = readme_settings();
    let help = help_settings();
    assert!(readme.len() >= 30, "README table not found: {readme:?}");
    let names = |m: &BTreeMap<String, String>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(&readme), names(&help), "variables differ");
    for (name, default) in &help {
        // `--help` cuts a default at its first space ("number of CPUs").
        let readme_default = &readme[name];
        assert!(
            readme_default.starts_with(default.as_str()),
            "{name}: README says {readme_default:?}, --help says {default:?}"
        );
    }
}
