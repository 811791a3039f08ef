//! The benches' clean-up, against the stack's Elasticsearch server: what they leave
//! behind slows the next pass.
#![allow(clippy::unwrap_used)] // a failed step should stop the test with its message

use sluice_bench::baselines::{delete_indices, index_names};

/// The indices whose names start with `prefix`, sorted.
async fn listed(config: &sluice::Config, prefix: &str) -> Vec<String> {
    let mut names = index_names(config, &format!("{prefix}*")).await.unwrap();
    names.sort();
    names
}

/// Elasticsearch 8 refuses to delete indices by a wildcard (the bench's old clean-up
/// failed silently and left every index it made): they are deleted by name, and only
/// those under the prefix.
#[tokio::test]
async fn a_prefix_s_indices_are_deleted_by_name_and_no_others() {
    let config = sluice_tests::stack_config();
    let client = sluice_sinks::elasticsearch::client(&config.elasticsearch).unwrap();
    let prefix = sluice_tests::unique("bt-clean-");
    let (a, b, other) = (
        format!("{prefix}-a"),
        format!("{prefix}-b"),
        format!("{prefix}x-c"),
    );
    for name in [&a, &b, &other] {
        client
            .indices()
            .create(elasticsearch::indices::IndicesCreateParts::Index(name))
            .send()
            .await
            .unwrap()
            .error_for_status_code()
            .unwrap();
    }
    assert_eq!(
        listed(&config, &prefix).await,
        [a.clone(), b, other.clone()]
    );

    delete_indices(&config, &prefix).await.unwrap();
    assert_eq!(
        listed(&config, &prefix).await,
        std::slice::from_ref(&other),
        "the prefix's indices are gone, the one outside it stays"
    );
    // Nothing left under the prefix: deleting again is no error.
    delete_indices(&config, &prefix).await.unwrap();

    client
        .indices()
        .delete(elasticsearch::indices::IndicesDeleteParts::Index(&[&other]))
        .send()
        .await
        .unwrap();
}
