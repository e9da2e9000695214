use std::path::{Path, PathBuf};

use super::*;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/files")
        .join(name)
}

fn names<T>(list: &[T], f: impl Fn(&T) -> Option<&String>) -> Vec<String> {
    list.iter().filter_map(|o| f(o).cloned()).collect()
}

#[test]
fn a_multi_document_file_gives_each_object_by_kind_and_skips_other_kinds() {
    let l = load(&fixture("multi.yaml")).unwrap();
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    let o = &l.objects;
    assert_eq!(names(&o.namespaces, |n| n.metadata.name.as_ref()), ["shop"]);
    assert_eq!(names(&o.pods, |p| p.metadata.name.as_ref()), ["web"]);
    assert_eq!(o.network_policies.len(), 1);
    assert_eq!(l.skipped.get("apps/v1 Deployment"), Some(&1));
    assert_eq!(l.files, [fixture("multi.yaml")]);
}

#[test]
fn a_namespaced_object_without_a_namespace_is_put_in_default() {
    let l = load(&fixture("multi.yaml")).unwrap();
    let np = &l.objects.network_policies[0];
    assert_eq!(np.metadata.namespace.as_deref(), Some(DEFAULT_NAMESPACE));
    assert!(l.objects.namespaces[0].metadata.namespace.is_none());
}

#[test]
fn origins_name_the_file_the_document_and_its_first_line() {
    let l = load(&fixture("multi.yaml")).unwrap();
    let origin = |kind, ns, name| l.objects.origins[&ObjectRef::new(kind, ns, name)].clone();
    let ns = origin("Namespace", "", "shop");
    assert_eq!((ns.document, ns.line, ns.item), (1, Some(2), None));
    let pod = origin("Pod", "shop", "web");
    assert_eq!((pod.document, pod.line), (2, Some(9)));
    let np = origin("NetworkPolicy", "default", "deny-all");
    assert_eq!((np.document, np.line), (3, Some(24)));
    assert_eq!(np.file, fixture("multi.yaml"));
}

#[test]
fn a_list_gives_its_items_with_their_index() {
    let l = load(&fixture("list.yaml")).unwrap();
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    assert_eq!(
        names(&l.objects.services, |s| s.metadata.name.as_ref()),
        ["web"]
    );
    assert_eq!(
        names(&l.objects.nodes, |n| n.metadata.name.as_ref()),
        ["node-1"]
    );
    assert_eq!(l.skipped.get("v1 ConfigMap"), Some(&1));
    let node = &l.objects.origins[&ObjectRef::new("Node", "", "node-1")];
    assert_eq!((node.document, node.item), (1, Some(1)));
}

#[test]
fn bad_documents_are_errors_with_their_place_and_the_good_ones_are_kept() {
    let l = load(&fixture("bad.yaml")).unwrap();
    assert_eq!(names(&l.objects.pods, |p| p.metadata.name.as_ref()), ["ok"]);
    let errs: Vec<(usize, &str)> = l
        .errors
        .iter()
        .map(|e| (e.origin.document, e.message.as_str()))
        .collect();
    assert_eq!(errs.len(), 3, "{errs:?}");
    assert_eq!(errs[0].0, 2);
    assert!(errs[0].1.starts_with("invalid Pod: "), "{}", errs[0].1);
    assert_eq!(errs[1], (3, "no apiVersion or kind"));
    assert_eq!(errs[2].0, 4);
    assert!(errs[2].1.starts_with("invalid YAML: "), "{}", errs[2].1);
    let shown = l.errors[0].to_string();
    assert!(
        shown.contains("bad.yaml: document 2 (line 7): invalid Pod: invalid type"),
        "{shown}"
    );
}

#[test]
fn a_directory_is_walked_recursively_for_yaml_yml_and_json_only() {
    let l = load(&fixture("dir")).unwrap();
    assert!(l.errors.is_empty(), "{:?}", l.errors);
    assert_eq!(
        l.files,
        [fixture("dir/cnp.json"), fixture("dir/sub/ns.yml")]
    );
    let cnp = &l.objects.cluster_network_policies[0];
    assert_eq!(cnp.metadata.name.as_deref(), Some("deny-ssh"));
    assert_eq!(cnp.spec.priority, 10);
    assert_eq!(
        names(&l.objects.namespaces, |n| n.metadata.name.as_ref()),
        ["deep"]
    );
}

#[test]
fn a_missing_path_or_a_directory_without_manifests_is_an_error() {
    assert!(matches!(load(&fixture("nope")), Err(LoadError::Io { .. })));
    let empty = std::env::temp_dir().join(format!("sluice-files-empty-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    let r = load(&empty);
    std::fs::remove_dir_all(&empty).unwrap();
    assert!(matches!(r, Err(LoadError::NoFiles(_))));
}

#[test]
fn document_lines_skip_a_leading_separator_and_comments() {
    assert_eq!(document_lines("---\na: 1\n---\nb: 2\n"), [2, 4]);
    assert_eq!(
        document_lines("# c\na: 1\n---\n# x\nb: 2\n---\n"),
        [2, 5, 6]
    );
    let docs = yaml_docs("# c\na: 1\n---\n# x\nb: 2\n---\n");
    assert_eq!(
        docs.len(),
        3,
        "a trailing separator is an empty document: {docs:?}"
    );
}

#[test]
fn several_paths_load_into_one_set_in_the_order_given() {
    let l = load_all(&[fixture("dir"), fixture("list.yaml")]).unwrap();
    assert_eq!(
        l.files,
        [
            fixture("dir/cnp.json"),
            fixture("dir/sub/ns.yml"),
            fixture("list.yaml")
        ]
    );
    assert_eq!(l.objects.cluster_network_policies.len(), 1);
    assert_eq!(l.objects.services.len(), 1);
    assert!(matches!(
        load_all(&[fixture("list.yaml"), fixture("nope")]),
        Err(LoadError::Io { .. })
    ));
}
