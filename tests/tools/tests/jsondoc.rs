//! `stampwriter jsondoc`, as the VM scenarios run it on `migrate`'s output.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn jsondoc(kinds: &[&str], input: &str) -> Output {
    let doc = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/json.md");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stampwriter"))
        .arg("jsondoc")
        .arg(doc)
        .args(kinds)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{e}"));
    child
        .stdin
        .take()
        .unwrap_or_else(|| panic!("no stdin"))
        .write_all(input.as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    child.wait_with_output().unwrap_or_else(|e| panic!("{e}"))
}

const LINE: &str = r#"{"schema_version":1,"mode":"detached","state":"retired","marker":{"target_dev":"8:32","target_bytes":1048576,"switched_at":1700000000,"migration_id":7,"head_bytes":131072},"saved_head":null}"#;

#[test]
fn a_documented_line_passes_and_names_its_kind() {
    let o = jsondoc(&["status", "status-offline"], &format!("{LINE}\n"));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("1 lines match"));
}

#[test]
fn an_undocumented_field_or_no_input_fails() {
    let extra = LINE.replacen('{', r#"{"surprise":1,"#, 1);
    let o = jsondoc(&["status-offline"], &format!("{extra}\n"));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("field surprise is not documented"), "{err}");
    let o = jsondoc(&["status-offline"], "");
    assert_eq!(o.status.code(), Some(1));
    let o = jsondoc(&["no-such-kind"], &format!("{LINE}\n"));
    assert_eq!(o.status.code(), Some(1));
}
