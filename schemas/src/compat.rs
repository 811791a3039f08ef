//! `sluice schemas check`: every schema in `schemas/avro/` must read data written with
//! each of its released versions (`schemas/avro/released/<name>/v<N>.avsc`), so a new
//! stage or sink can consume what older ones wrote (backward, transitive).

use std::path::{Path, PathBuf};

use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;

/// Why the check could not run, or what it found incompatible.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// A schema file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A schema file is not a valid Avro schema.
    #[error("{path}: not a valid Avro schema: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The error.
        source: Box<apache_avro::Error>,
    },
}

/// The verdict for one schema against one released version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// The current schema's file.
    pub schema: PathBuf,
    /// The released version it was checked against.
    pub released: PathBuf,
    /// `None` when compatible, otherwise why not.
    pub incompatibility: Option<String>,
}

fn parse(path: &Path) -> Result<Schema, CheckError> {
    let text = std::fs::read_to_string(path).map_err(|source| CheckError::Read {
        path: path.into(),
        source,
    })?;
    Schema::parse_str(&text).map_err(|source| CheckError::Parse {
        path: path.into(),
        source: Box::new(source),
    })
}

fn files(dir: &Path, ext: &str) -> Result<Vec<PathBuf>, CheckError> {
    let read = std::fs::read_dir(dir).map_err(|source| CheckError::Read {
        path: dir.into(),
        source,
    })?;
    let mut out: Vec<PathBuf> = read
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == ext))
        .collect();
    out.sort();
    Ok(out)
}

/// Whether data written with `writer` can be read with `reader`; why not otherwise.
pub fn can_read(writer: &Schema, reader: &Schema) -> Option<String> {
    SchemaCompatibility::can_read(writer, reader)
        .err()
        .map(|e| e.to_string())
}

/// Check every `*.avsc` of `dir` against its released versions.
pub fn check_dir(dir: &Path) -> Result<Vec<Verdict>, CheckError> {
    let mut verdicts = Vec::new();
    for current in files(dir, "avsc")? {
        let reader = parse(&current)?;
        let stem = current
            .file_stem()
            .map(|s| s.to_string_lossy().to_string())
            .unwrap_or_default();
        let history = dir.join("released").join(&stem);
        if !history.is_dir() {
            continue;
        }
        for released in files(&history, "avsc")? {
            let writer = parse(&released)?;
            verdicts.push(Verdict {
                schema: current.clone(),
                released: released.clone(),
                incompatibility: can_read(&writer, &reader),
            });
        }
    }
    Ok(verdicts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(fields: &str) -> Schema {
        Schema::parse_str(&format!(
            r#"{{"type":"record","name":"E","fields":[{fields}]}}"#
        ))
        .unwrap()
    }

    #[test]
    fn added_fields_need_defaults() {
        let v1 = schema(r#"{"name":"id","type":"string"}"#);
        let with_default = schema(
            r#"{"name":"id","type":"string"},{"name":"n","type":["null","long"],"default":null}"#,
        );
        let without = schema(r#"{"name":"id","type":"string"},{"name":"n","type":"long"}"#);
        assert_eq!(can_read(&v1, &with_default), None);
        assert!(can_read(&v1, &without).is_some());
        let retyped = schema(r#"{"name":"id","type":"long"}"#);
        assert!(can_read(&v1, &retyped).is_some());
    }

    #[test]
    fn an_incompatible_change_is_named() {
        let dir = std::env::temp_dir().join(format!("sluice-compat-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("released/e")).unwrap();
        let v1 = r#"{"type":"record","name":"E","fields":[{"name":"id","type":"string"}]}"#;
        let v2 = r#"{"type":"record","name":"E","fields":[{"name":"id","type":"string"},{"name":"n","type":"long"}]}"#;
        std::fs::write(dir.join("released/e/v1.avsc"), v1).unwrap();
        std::fs::write(dir.join("e.avsc"), v2).unwrap();
        let verdicts = check_dir(&dir).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(verdicts.len(), 1);
        let why = verdicts[0].incompatibility.clone().unwrap();
        assert!(why.contains('n'), "{why}");
    }

    #[test]
    fn the_repository_schemas_are_backward_compatible() {
        let dir = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/avro"));
        let verdicts = check_dir(dir).unwrap();
        assert!(verdicts.len() >= 2, "{verdicts:?}");
        for v in verdicts {
            assert_eq!(v.incompatibility, None, "{v:?}");
        }
    }
}
