//! The pod field table of docs/agent.md against the field names of the Kubernetes version the
//! stack runs (`agent/tests/fixtures/k8s-pod-fields.json`, extracted from kube-apiserver's
//! OpenAPI document by `tests/env/pod-fields-fixture.sh`): every PodSpec, Container and Volume
//! field, and every field of the types they nest that a pod author sets, must have exactly one
//! row saying how the agent handles it, so a new Kubernetes release cannot slip a field past
//! the agent unnoticed.

use std::collections::{BTreeMap, BTreeSet};

/// Where the table lives and its markers.
const DOC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/agent.md");
const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/k8s-pod-fields.json"
);
const BEGIN: &str = "<!-- pod-field-table:begin -->";
const END: &str = "<!-- pod-field-table:end -->";

/// One row: handling and note.
#[derive(Debug)]
struct Row {
    handling: String,
    note: String,
    line: usize,
}

/// The rows of the delimited section, keyed `Type.field`; errors name the line.
fn parse_table(doc: &str) -> Result<BTreeMap<String, Row>, Vec<String>> {
    let mut errors = Vec::new();
    let begin = doc.find(BEGIN);
    let end = doc.find(END);
    let (Some(begin), Some(end)) = (begin, end) else {
        return Err(vec![format!("docs/agent.md lacks {BEGIN} … {END}")]);
    };
    if end < begin {
        return Err(vec![format!("{END} comes before {BEGIN}")]);
    }
    let first_line = doc[..begin].lines().count();
    let mut rows = BTreeMap::new();
    for (i, line) in doc[begin..end].lines().enumerate() {
        let line_no = first_line + i;
        let line = line.trim();
        if !line.starts_with('|') {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let key = cells[0];
        // Header and separator rows.
        if key == "field" || key.chars().all(|c| c == '-' || c == ':' || c == ' ') {
            continue;
        }
        let Some(name) = key.strip_prefix('`').and_then(|k| k.strip_suffix('`')) else {
            errors.push(format!(
                "docs/agent.md:{line_no}: first cell {key:?} is not `Type.field`"
            ));
            continue;
        };
        let well_formed = name.split_once('.').is_some_and(|(t, f)| {
            !t.is_empty()
                && !f.is_empty()
                && t.chars().all(|c| c.is_ascii_alphanumeric())
                && f.chars().all(|c| c.is_ascii_alphanumeric())
        });
        if !well_formed {
            errors.push(format!(
                "docs/agent.md:{line_no}: {name:?} is not Type.field"
            ));
            continue;
        }
        if cells.len() < 3 {
            errors.push(format!(
                "docs/agent.md:{line_no}: {name}: needs | field | handling | note |"
            ));
            continue;
        }
        let handling = cells[1].to_owned();
        // A note may contain `|` only inside code spans in theory; rejoin what split.
        let note = cells[2..].join("|").trim().to_owned();
        if !["mapped", "refused", "ignored"].contains(&handling.as_str()) {
            errors.push(format!(
                "docs/agent.md:{line_no}: {name}: handling {handling:?} is not mapped, refused or ignored"
            ));
        }
        if note.is_empty() {
            errors.push(format!(
                "docs/agent.md:{line_no}: {name}: says nothing about what it becomes or why"
            ));
        }
        if let Some(prev) = rows.insert(
            name.to_owned(),
            Row {
                handling,
                note,
                line: line_no,
            },
        ) {
            errors.push(format!(
                "docs/agent.md:{line_no}: {name} listed twice (also line {})",
                prev.line
            ));
        }
    }
    if errors.is_empty() {
        Ok(rows)
    } else {
        Err(errors)
    }
}

/// `Type.field` of every field in the fixture.
fn fixture_fields(fixture: &str) -> BTreeSet<String> {
    let v: serde_json::Value = serde_json::from_str(fixture).expect("fixture is JSON");
    let types = v["types"].as_object().expect("fixture has types");
    assert!(!types.is_empty(), "fixture lists no types");
    types
        .iter()
        .flat_map(|(t, fields)| {
            let fields = fields.as_array().expect("a type's fields are a list");
            assert!(!fields.is_empty(), "fixture: {t} has no fields");
            fields
                .iter()
                .map(move |f| format!("{t}.{}", f.as_str().expect("a field name is a string")))
        })
        .collect()
}

/// Differences between the table and the fixture, as messages.
fn compare(rows: &BTreeMap<String, Row>, fields: &BTreeSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    for f in fields {
        if !rows.contains_key(f) {
            out.push(format!(
                "{f} has no row in docs/agent.md's pod field table: say whether it is mapped, refused or ignored"
            ));
        }
    }
    for (name, row) in rows {
        if !fields.contains(name) {
            out.push(format!(
                "docs/agent.md:{}: {name} is not a field of the fixture's Kubernetes version",
                row.line
            ));
        }
    }
    out
}

#[test]
fn every_pod_field_of_the_pinned_kubernetes_has_exactly_one_row() {
    let doc = std::fs::read_to_string(DOC).expect("docs/agent.md");
    let fixture = std::fs::read_to_string(FIXTURE).expect("pod field fixture");
    let rows = parse_table(&doc).unwrap_or_else(|e| panic!("{}", e.join("\n")));
    let fields = fixture_fields(&fixture);
    let problems = compare(&rows, &fields);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // Every refusal the spec parser names must say what the user sees.
    for (name, row) in &rows {
        assert!(
            row.handling != "refused" || row.note.len() > 10,
            "{name}: a refusal needs the reason the user sees"
        );
    }
}

#[test]
fn the_check_catches_a_missing_field_an_unknown_one_and_a_bad_row() {
    let fields: BTreeSet<String> = ["PodSpec.hostPID", "PodSpec.volumes"]
        .into_iter()
        .map(String::from)
        .collect();
    let doc = format!(
        "intro\n{BEGIN}\n| field | handling | note |\n| --- | --- | --- |\n\
         | `PodSpec.hostPID` | refused | `spec.hostPID: not supported` |\n\
         | `PodSpec.hostPid` | ignored | a typo |\n{END}\n"
    );
    let rows = parse_table(&doc).unwrap();
    let problems = compare(&rows, &fields);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].starts_with("PodSpec.volumes has no row"));
    assert!(problems[1].contains("PodSpec.hostPid is not a field"));
    let bad = format!(
        "{BEGIN}\n| `PodSpec.volumes` | maybe | x |\n| `PodSpec.volumes` | mapped | |\n{END}"
    );
    let errors = parse_table(&bad).unwrap_err();
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(parse_table("no table here").is_err());
}
