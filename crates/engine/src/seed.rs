//! Preparing a fresh installation: the bundled example templates.

use crate::{Error, Result};
use tasker_store::{RegistrationOutcome, Store};

/// A template shipped with the binary: a file name and its YAML.
#[derive(Debug, Clone, Copy)]
pub struct BundledTemplate {
    pub file: &'static str,
    pub source: &'static str,
}

/// On a database with no templates at all, registers the bundled ones so a first start has
/// something to explore. Returns how many were registered (0 when templates already exist:
/// an operator's deletions or replacements are never undone).
pub async fn seed_templates(store: &Store, templates: &[BundledTemplate]) -> Result<usize> {
    if store.has_templates().await? {
        return Ok(0);
    }
    register_bundled(store, templates).await
}

/// Registers bundled templates whatever else exists (identical content again is unchanged);
/// one an operator changed under the same version is kept, with a warning. Returns how many
/// were created.
pub async fn register_bundled(store: &Store, templates: &[BundledTemplate]) -> Result<usize> {
    let mut registered = 0;
    for template in templates {
        match store.register_template(template.source, false).await {
            Ok(registration) if registration.outcome == RegistrationOutcome::Created => {
                registered += 1;
                tracing::info!(template = %registration.template.template.key(), "registered bundled template");
            }
            Ok(_) => {}
            Err(tasker_store::Error::Conflict(message)) => {
                tracing::warn!(file = template.file, %message, "a bundled template was changed here; keeping it");
            }
            Err(source) => {
                return Err(Error::Template {
                    name: template.file.to_owned(),
                    source,
                });
            }
        }
    }
    Ok(registered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tasker_store::testing::TestDatabase;

    const ONE: BundledTemplate = BundledTemplate {
        file: "one.yaml",
        source: "namespace: a\nname: one\nversion: 1.0.0\nsteps:\n  - {name: x, handler: noop}\n",
    };

    #[tokio::test]
    async fn seeds_only_an_empty_database() {
        for db in TestDatabase::all(Arc::new(tasker_domain::SystemClock)).await {
            assert_eq!(seed_templates(&db.store, &[ONE]).await.unwrap(), 1);
            let other = BundledTemplate {
                file: "two.yaml",
                source: "namespace: a\nname: two\nversion: 1.0.0\nsteps:\n  - {name: y, handler: noop}\n",
            };
            assert_eq!(seed_templates(&db.store, &[ONE, other]).await.unwrap(), 0);
            assert_eq!(db.store.templates(None, None).await.unwrap().len(), 1);
        }
    }

    #[tokio::test]
    async fn a_broken_bundled_template_names_its_file() {
        let db = TestDatabase::sqlite(Arc::new(tasker_domain::SystemClock)).await;
        let broken = BundledTemplate {
            file: "broken.yaml",
            source: "namespace: a\n",
        };
        let err = seed_templates(&db.store, &[broken]).await.unwrap_err();
        assert!(
            err.to_string().starts_with("template broken.yaml:"),
            "{err}"
        );
    }
}
