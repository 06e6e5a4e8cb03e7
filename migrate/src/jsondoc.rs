//! The documented shape of `migrate`'s JSON outputs (`docs/json.md`), and a
//! check of real outputs against it.
//!
//! The document marks each kind of output with a line
//! `<!-- jsondoc: KIND -->`, followed by a table whose first columns are
//! `field`, `type` and `required`:
//!
//! - `field`: a name, `a.b` inside an object `a`, `a[].b` inside the objects
//!   of an array `a`; `...` takes in every field of the kind named by `type`;
//! - `type`: alternatives joined by ` or `: `integer`, `number`, `string`,
//!   `boolean`, `null`, `object`, `array`, `array of T`, or the name of
//!   another kind (an object of that kind);
//! - `required`: `yes` (the field is always there, perhaps `null` if its
//!   type allows it) or `no`.
//!
//! An output fails its check when it has a field the table does not name,
//! lacks a required one, or has a value of another type.

use std::collections::BTreeMap;

use serde_json::Value;

/// A document that cannot be read as a description of outputs.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {what}")]
pub struct DocError {
    /// Line number, from 1.
    pub line: usize,
    /// What is wrong with it.
    pub what: String,
}

/// One documented field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// `a`, `a.b`, `a[].b`.
    pub path: String,
    /// Alternatives of its type.
    pub types: Vec<String>,
    /// Always present.
    pub required: bool,
}

/// The documented kinds, each a list of fields (inclusions resolved).
#[derive(Clone, Debug, Default)]
pub struct Doc {
    kinds: BTreeMap<String, Vec<Field>>,
}

const BASE: [&str; 7] = [
    "integer", "number", "string", "boolean", "null", "object", "array",
];

fn cells(line: &str) -> Vec<String> {
    line.trim()
        .trim_matches('|')
        .split('|')
        .map(|c| c.trim().replace('`', ""))
        .collect()
}

impl Doc {
    /// Reads the kinds documented in `text` (markdown).
    pub fn parse(text: &str) -> Result<Self, DocError> {
        let err = |line: usize, what: String| DocError { line, what };
        let mut raw: BTreeMap<String, (usize, Vec<Field>)> = BTreeMap::new();
        let mut current: Option<String> = None;
        let mut in_table = false;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let t = line.trim();
            if let Some(k) = t
                .strip_prefix("<!-- jsondoc:")
                .and_then(|r| r.strip_suffix("-->"))
            {
                let k = k.trim().to_owned();
                if raw.insert(k.clone(), (n, Vec::new())).is_some() {
                    return Err(err(n, format!("kind {k} is documented twice")));
                }
                current = Some(k);
                in_table = false;
                continue;
            }
            let Some(k) = &current else { continue };
            if !t.starts_with('|') {
                if in_table {
                    current = None;
                }
                continue;
            }
            let c = cells(t);
            if !in_table {
                if c.len() < 3 || c[0] != "field" || c[1] != "type" || c[2] != "required" {
                    return Err(err(
                        n,
                        format!("the table of {k} must begin with | field | type | required |"),
                    ));
                }
                in_table = true;
                continue;
            }
            if c[0].chars().all(|ch| ch == '-' || ch == ':') {
                continue;
            }
            if c.len() < 3 {
                return Err(err(n, "a row needs a field, a type and required".into()));
            }
            let required = match c[2].as_str() {
                "yes" => true,
                "no" => false,
                other => return Err(err(n, format!("required is yes or no, not {other:?}"))),
            };
            let types = c[1].split(" or ").map(|s| s.trim().to_owned()).collect();
            if let Some((_, fields)) = raw.get_mut(k) {
                fields.push(Field {
                    path: c[0].clone(),
                    types,
                    required,
                });
            }
        }
        // Every type names a base type or a kind; inclusions are resolved.
        for (k, (line, fields)) in &raw {
            for f in fields {
                for t in &f.types {
                    let t = t.strip_prefix("array of ").unwrap_or(t);
                    if !BASE.contains(&t) && !raw.contains_key(t) {
                        return Err(err(
                            *line,
                            format!("{k}: field {}: unknown type {t:?}", f.path),
                        ));
                    }
                }
            }
        }
        let mut kinds = BTreeMap::new();
        for k in raw.keys() {
            let mut seen = Vec::new();
            kinds.insert(k.clone(), resolve(&raw, k, &mut seen)?);
        }
        Ok(Self { kinds })
    }

    /// The documented kinds.
    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().map(String::as_str)
    }

    /// The fields of `kind`.
    pub fn fields(&self, kind: &str) -> Option<&[Field]> {
        self.kinds.get(kind).map(Vec::as_slice)
    }

    /// Checks `v` against the first of `kinds` it matches; if none, the
    /// problems found against the closest one.
    pub fn check(&self, kinds: &[&str], v: &Value) -> Result<(), Vec<String>> {
        let mut best: Option<Vec<String>> = None;
        for k in kinds {
            let Some(fields) = self.kinds.get(*k) else {
                return Err(vec![format!("{k} is not a documented kind")]);
            };
            let mut problems = Vec::new();
            match v {
                Value::Object(_) => self.object(fields, "", v, &mut problems),
                _ => problems.push(format!("not an object: {v}")),
            }
            if problems.is_empty() {
                return Ok(());
            }
            let problems: Vec<String> = problems.into_iter().map(|p| format!("{k}: {p}")).collect();
            if best.as_ref().is_none_or(|b| b.len() > problems.len()) {
                best = Some(problems);
            }
        }
        Err(best.unwrap_or_else(|| vec!["no kind given".into()]))
    }

    fn object(&self, fields: &[Field], prefix: &str, v: &Value, out: &mut Vec<String>) {
        let Value::Object(m) = v else { return };
        for (key, val) in m {
            let path = format!("{prefix}{key}");
            match fields.iter().find(|f| f.path == path) {
                None => out.push(format!("field {path} is not documented")),
                Some(f) => self.value(fields, &path, &f.types, val, out),
            }
        }
        for f in fields.iter().filter(|f| f.required) {
            let Some(name) = f.path.strip_prefix(prefix) else {
                continue;
            };
            if !name.contains('.') && !name.contains("[]") && !m.contains_key(name) {
                out.push(format!("required field {} is missing", f.path));
            }
        }
    }

    fn value(
        &self,
        fields: &[Field],
        path: &str,
        types: &[String],
        v: &Value,
        out: &mut Vec<String>,
    ) {
        // The problems against the closest alternative of the value's own
        // JSON type (an object's against the kinds and `object`).
        let mut closest: Option<Vec<String>> = None;
        for t in types.iter().filter(|t| same_shape(t, v)) {
            let mut p = Vec::new();
            self.one(fields, path, t, v, &mut p);
            if p.is_empty() {
                return;
            }
            if closest.as_ref().is_none_or(|c| c.len() > p.len()) {
                closest = Some(p);
            }
        }
        out.extend(closest.unwrap_or_else(|| {
            vec![format!(
                "field {path} is {v}, not of type {}",
                types.join(" or ")
            )]
        }));
    }

    fn one(&self, fields: &[Field], path: &str, t: &str, v: &Value, out: &mut Vec<String>) {
        let wrong =
            |out: &mut Vec<String>| out.push(format!("field {path} is {v}, not of type {t}"));
        if let Some(elem) = t.strip_prefix("array of ") {
            let Value::Array(a) = v else {
                return wrong(out);
            };
            for e in a {
                self.one(fields, &format!("{path}[]"), elem, e, out);
            }
            return;
        }
        let ok = match t {
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "string" => v.is_string(),
            "boolean" => v.is_boolean(),
            "null" => v.is_null(),
            "array" => v.is_array(),
            "object" => {
                if v.is_object() {
                    self.object(fields, &format!("{path}."), v, out);
                }
                v.is_object()
            }
            kind => match (self.kinds.get(kind), v) {
                (Some(kf), Value::Object(_)) => {
                    let mut p = Vec::new();
                    self.object(kf, "", v, &mut p);
                    out.extend(p.into_iter().map(|p| format!("{path} ({kind}): {p}")));
                    true
                }
                _ => false,
            },
        };
        if !ok {
            wrong(out);
        }
    }
}

/// Whether `v` has the JSON type of `t` (its fields aside).
fn same_shape(t: &str, v: &Value) -> bool {
    match t {
        "integer" | "number" => v.is_number(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "array" => v.is_array(),
        t if t.starts_with("array of ") => v.is_array(),
        _ => v.is_object(),
    }
}

fn resolve(
    raw: &BTreeMap<String, (usize, Vec<Field>)>,
    kind: &str,
    seen: &mut Vec<String>,
) -> Result<Vec<Field>, DocError> {
    let (line, fields) = &raw[kind];
    if seen.iter().any(|s| s == kind) {
        return Err(DocError {
            line: *line,
            what: format!("{kind} includes itself"),
        });
    }
    seen.push(kind.to_owned());
    let mut out = Vec::new();
    for f in fields {
        if f.path == "..." {
            for t in &f.types {
                if raw.contains_key(t.as_str()) {
                    out.extend(resolve(raw, t, seen)?);
                }
            }
        } else {
            out.push(f.clone());
        }
    }
    seen.pop();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "
# x
<!-- jsondoc: inner -->
| field | type | required | meaning |
|-------|------|----------|---------|
| a | integer | yes | an a |
| b | string or null | no | a b |

<!-- jsondoc: outer -->
| field | type | required | meaning |
|---|---|---|---|
| v | integer | yes | version |
| ... | inner | yes | the inner fields |
| list | array of object | yes | things |
| list[].name | string | yes | a name |
| one | inner or null | yes | an inner |
";

    fn check(kind: &str, j: &str) -> Result<(), Vec<String>> {
        let doc = Doc::parse(DOC).unwrap_or_else(|e| panic!("{e}"));
        doc.check(
            &[kind],
            &serde_json::from_str(j).unwrap_or_else(|e| panic!("{e}")),
        )
    }

    #[test]
    fn a_documented_output_passes() {
        assert_eq!(check("inner", r#"{"a": 1}"#), Ok(()));
        assert_eq!(
            check(
                "outer",
                r#"{"v": 1, "a": 2, "b": null, "list": [{"name": "x"}], "one": {"a": 3}}"#
            ),
            Ok(())
        );
    }

    #[test]
    fn an_undocumented_or_missing_or_mistyped_field_fails() {
        let e = check("inner", r#"{"a": 1, "c": 2}"#).unwrap_err();
        assert!(e[0].contains("field c is not documented"), "{e:?}");
        let e = check("inner", r#"{"b": "x"}"#).unwrap_err();
        assert!(e[0].contains("required field a is missing"), "{e:?}");
        let e = check("inner", r#"{"a": 1.5}"#).unwrap_err();
        assert!(e[0].contains("not of type integer"), "{e:?}");
        let e = check(
            "outer",
            r#"{"v": 1, "a": 2, "list": [{"nom": "x"}], "one": null}"#,
        )
        .unwrap_err();
        assert!(
            e.iter().any(|p| p.contains("list[].nom is not documented")),
            "{e:?}"
        );
        assert!(
            e.iter().any(|p| p.contains("list[].name is missing")),
            "{e:?}"
        );
        let e = check("outer", r#"{"v": 1, "a": 2, "list": [], "one": {"z": 1}}"#).unwrap_err();
        assert!(
            e.iter().any(|p| p.contains("one (inner): field z")),
            "{e:?}"
        );
    }

    #[test]
    fn a_bad_document_is_refused() {
        assert!(Doc::parse("<!-- jsondoc: k -->\n| name | type |\n").is_err());
        let e = Doc::parse(
            "<!-- jsondoc: k -->\n| field | type | required |\n|-|-|-|\n| a | float | yes |\n",
        )
        .unwrap_err();
        assert!(e.what.contains("unknown type \"float\""), "{e}");
    }
}
