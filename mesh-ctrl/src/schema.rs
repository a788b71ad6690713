//! Strict deserialization of Kubernetes objects: a field the schema does not have is an error
//! naming it (serde alone would drop it silently), and every error names the field's path.
//! Used by the directory source and by the offline validation of `manifests/`.

use serde::de::DeserializeOwned;
use serde_yaml::Value;

/// Deserializes `doc` as `T`, rejecting fields the Kubernetes schema does not have.
pub fn strict<T: DeserializeOwned>(doc: Value) -> Result<T, (Option<String>, String)> {
    let mut unknown = Vec::new();
    let mut record = |path: serde_ignored::Path<'_>| unknown.push(field_path(&path));
    let de = serde_ignored::Deserializer::new(doc, &mut record);
    let value: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let field = (path != ".").then_some(path);
        (field, e.into_inner().to_string())
    })?;
    match unknown.into_iter().next() {
        Some(field) => Err((Some(field), "unknown field (not in the Kubernetes schema)".into())),
        None => Ok(value),
    }
}

/// `spec.containers[0].name` form of a serde_ignored path (its own Display marks each
/// `Option` with `?`, which means nothing to an operator).
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => match field_path(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => field_path(parent),
    }
}
