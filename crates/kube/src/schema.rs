//! From the config model's JSON Schema (schemars, draft 2020-12) to the
//! structural OpenAPI v3 schema a CustomResourceDefinition takes: no
//! references, a type on every node, no defaults (the API server would
//! write them into stored objects), and Kubernetes' own markers for
//! IntOrString and free-form values.

use serde_json::{Map, Value, json};

/// Schema keywords a CustomResourceDefinition accepts and we keep.
const KEPT: &[&str] = &[
    "type",
    "description",
    "properties",
    "items",
    "additionalProperties",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "required",
    "nullable",
];

/// Formats Kubernetes knows; others (`uint32`, `uint`) are dropped, their
/// bounds stay as `minimum`/`maximum`.
const FORMATS: &[&str] = &["int32", "int64", "float", "double", "byte", "date-time"];

/// Nesting this deep means a recursive type, which a CRD cannot express.
const MAX_DEPTH: usize = 32;

/// Converts `root` (a schemars root schema with its `$defs`) to a structural
/// schema.
pub fn structural(root: &Value) -> Result<Value, String> {
    let defs = root
        .get("$defs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    convert(root, &defs, 0)
}

fn convert(schema: &Value, defs: &Map<String, Value>, depth: usize) -> Result<Value, String> {
    if depth > MAX_DEPTH {
        return Err("the schema nests too deep (a recursive type?)".into());
    }
    let obj = match schema {
        // `true` / `{}`: any value (serde_json::Value in the model).
        Value::Bool(true) => return Ok(free_form()),
        Value::Object(o) if o.is_empty() => return Ok(free_form()),
        Value::Object(o) => o,
        _ => return Err(format!("unexpected schema {schema}")),
    };
    if let Some(target) = obj.get("$ref").and_then(Value::as_str) {
        let name = target.trim_start_matches("#/$defs/");
        let def = defs
            .get(name)
            .ok_or_else(|| format!("no definition {target}"))?;
        let mut out = convert(def, defs, depth + 1)?;
        // A description next to a reference describes the field.
        if let (Some(d), Some(o)) = (obj.get("description"), out.as_object_mut()) {
            o.insert("description".into(), d.clone());
        }
        return Ok(out);
    }
    if let Some(variants) = obj
        .get("anyOf")
        .or_else(|| obj.get("oneOf"))
        .and_then(Value::as_array)
    {
        return alternatives(obj, variants, defs, depth);
    }
    let mut out = Map::new();
    for (key, value) in obj {
        match key.as_str() {
            "type" => set_type(&mut out, value)?,
            "const" => {
                out.insert("enum".into(), json!([value]));
            }
            "format" if value.as_str().is_some_and(|f| FORMATS.contains(&f)) => {
                out.insert(key.clone(), value.clone());
            }
            "properties" => {
                let mut props = Map::new();
                for (name, prop) in value.as_object().into_iter().flatten() {
                    props.insert(name.clone(), convert(prop, defs, depth + 1)?);
                }
                out.insert(key.clone(), Value::Object(props));
            }
            "items" => {
                out.insert(key.clone(), convert(value, defs, depth + 1)?);
            }
            // `false` (unknown fields refused) is not allowed in a CRD; the
            // API server's strict field validation refuses them instead.
            "additionalProperties" if value.is_object() => {
                out.insert(key.clone(), convert(value, defs, depth + 1)?);
            }
            k if KEPT.contains(&k) && k != "additionalProperties" => {
                out.insert(key.clone(), value.clone());
            }
            _ => {}
        }
    }
    if !out.contains_key("type") {
        if out.contains_key("properties") || out.contains_key("additionalProperties") {
            out.insert("type".into(), json!("object"));
        } else {
            return Ok(free_form());
        }
    }
    Ok(Value::Object(out))
}

/// `anyOf`/`oneOf`: `Option<T>` (T or null), an enum written as one
/// constant per variant, or an integer-or-string.
fn alternatives(
    obj: &Map<String, Value>,
    variants: &[Value],
    defs: &Map<String, Value>,
    depth: usize,
) -> Result<Value, String> {
    let non_null: Vec<&Value> = variants
        .iter()
        .filter(|v| v.get("type").and_then(Value::as_str) != Some("null"))
        .collect();
    let nullable = non_null.len() < variants.len();
    let mut out = if let [only] = non_null.as_slice() {
        convert(only, defs, depth + 1)?
    } else if let Some(values) = non_null
        .iter()
        .map(|v| {
            v.get("const")
                .or_else(|| v.get("enum").and_then(|e| e.get(0)))
                .cloned()
        })
        .collect::<Option<Vec<_>>>()
    {
        json!({ "type": "string", "enum": values })
    } else {
        let types: Vec<Value> = non_null
            .iter()
            .map(|v| convert(v, defs, depth + 1).map(|c| c["type"].clone()))
            .collect::<Result<_, _>>()?;
        if types.contains(&json!("integer")) && types.contains(&json!("string")) {
            json!({ "x-kubernetes-int-or-string": true })
        } else {
            free_form()
        }
    };
    if let Some(o) = out.as_object_mut() {
        if nullable && o.contains_key("type") {
            o.insert("nullable".into(), json!(true));
        }
        if let Some(d) = obj.get("description") {
            o.insert("description".into(), d.clone());
        }
    }
    Ok(out)
}

/// `"type": ["string", "null"]` becomes a nullable string.
fn set_type(out: &mut Map<String, Value>, value: &Value) -> Result<(), String> {
    match value {
        Value::String(_) => {
            out.insert("type".into(), value.clone());
        }
        Value::Array(types) => {
            let real: Vec<&Value> = types.iter().filter(|t| *t != "null").collect();
            let [only] = real.as_slice() else {
                return Err(format!("a field of several types {value}"));
            };
            out.insert("type".into(), (*only).clone());
            if real.len() < types.len() {
                out.insert("nullable".into(), json!(true));
            }
        }
        _ => return Err(format!("unexpected type {value}")),
    }
    Ok(())
}

fn free_form() -> Value {
    json!({ "x-kubernetes-preserve-unknown-fields": true })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_options_and_enums_become_structural() {
        let root = json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": "X",
            "type": "object",
            "additionalProperties": false,
            "properties": {
                "port": { "anyOf": [{ "$ref": "#/$defs/Port" }, { "type": "null" }] },
                "name": { "type": ["string", "null"], "default": null },
                "mode": { "oneOf": [{ "const": "A", "type": "string" }, { "const": "B", "type": "string" }] },
                "target": { "anyOf": [{ "type": "integer", "format": "uint32" }, { "type": "string" }] },
                "raw": true,
                "labels": { "type": "object", "additionalProperties": { "type": "string" } }
            },
            "$defs": { "Port": { "type": "object", "properties": {
                "number": { "type": "integer", "format": "uint32", "minimum": 0, "default": 0 } } } }
        });
        let got = structural(&root).unwrap();
        assert_eq!(
            got,
            json!({
                "type": "object",
                "properties": {
                    "port": { "type": "object", "nullable": true, "properties": {
                        "number": { "type": "integer", "minimum": 0 } } },
                    "name": { "type": "string", "nullable": true },
                    "mode": { "type": "string", "enum": ["A", "B"] },
                    "target": { "x-kubernetes-int-or-string": true },
                    "raw": { "x-kubernetes-preserve-unknown-fields": true },
                    "labels": { "type": "object", "additionalProperties": { "type": "string" } }
                }
            })
        );
    }

    #[test]
    fn a_recursive_type_is_an_error() {
        let root = json!({ "$ref": "#/$defs/A", "$defs": { "A": { "type": "object",
            "properties": { "a": { "$ref": "#/$defs/A" } } } } });
        assert!(structural(&root).unwrap_err().contains("recursive"));
    }
}
