use std::{os::unix::fs::MetadataExt as _, time::Duration};

use super::*;

const CONFLIST: &str = r#"{"cniVersion":"1.0.0","name":"sluice","plugins":[{"type":"sluice"}]}"#;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn install_copies_the_plugin_and_conflist_with_their_modes_and_leaves_no_temporary_file() {
    let src = tempfile::tempdir().unwrap();
    let (bin, conf) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let plugin = src.path().join("sluice");
    std::fs::write(&plugin, b"\x7fELF plugin v1").unwrap();
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o700)).unwrap();
    let conflist = src.path().join("10-sluice.conflist");
    std::fs::write(&conflist, CONFLIST).unwrap();

    assert_eq!(
        install_plugin(&plugin, bin.path()).unwrap(),
        Outcome::Written
    );
    let (dest, outcome) = install_conflist(&conflist, conf.path()).unwrap();
    assert_eq!(outcome, Outcome::Written);
    assert_eq!(dest, conf.path().join("10-sluice.conflist"));
    assert_eq!(
        std::fs::read(bin.path().join("sluice")).unwrap(),
        b"\x7fELF plugin v1"
    );
    assert_eq!(mode(&bin.path().join("sluice")), 0o755);
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), CONFLIST);
    assert_eq!(mode(&dest), 0o644);
    assert_eq!(names(bin.path()), ["sluice"]);
    assert_eq!(names(conf.path()), ["10-sluice.conflist"]);
}

#[test]
fn installing_again_is_a_no_op_and_new_content_replaces_the_file_by_rename() {
    let src = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    let plugin = src.path().join("sluice");
    std::fs::write(&plugin, b"v1").unwrap();
    install_plugin(&plugin, bin.path()).unwrap();
    let dest = bin.path().join("sluice");
    let inode = std::fs::metadata(&dest).unwrap().ino();
    assert_eq!(
        install_plugin(&plugin, bin.path()).unwrap(),
        Outcome::Unchanged
    );
    assert_eq!(std::fs::metadata(&dest).unwrap().ino(), inode, "untouched");
    // A runtime may be running the old binary: it is replaced, not rewritten
    // in place (which would fail with ETXTBSY or corrupt the running copy).
    let old = std::fs::File::open(&dest).unwrap();
    std::fs::write(&plugin, b"v2").unwrap();
    assert_eq!(
        install_plugin(&plugin, bin.path()).unwrap(),
        Outcome::Written
    );
    assert_ne!(std::fs::metadata(&dest).unwrap().ino(), inode, "a new file");
    assert_eq!(std::fs::read(&dest).unwrap(), b"v2");
    assert_eq!(old.metadata().unwrap().ino(), inode);
    // A wrong mode alone is repaired.
    std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        install_plugin(&plugin, bin.path()).unwrap(),
        Outcome::Written
    );
    assert_eq!(mode(&dest), 0o755);
    assert_eq!(names(bin.path()), ["sluice"]);
}

#[test]
fn a_file_that_is_not_a_conflist_is_refused_and_the_installed_one_stays() {
    let src = tempfile::tempdir().unwrap();
    let conf = tempfile::tempdir().unwrap();
    let good = src.path().join("10-sluice.conflist");
    std::fs::write(&good, CONFLIST).unwrap();
    install_conflist(&good, conf.path()).unwrap();
    for bad in ["{\"cniVersion\": \"1.0.0\", \"plug", "[1, 2]"] {
        std::fs::write(&good, bad).unwrap();
        let err = install_conflist(&good, conf.path()).unwrap_err();
        assert!(matches!(err, InstallError::NotAConflist { .. }), "{err}");
    }
    assert_eq!(
        std::fs::read_to_string(conf.path().join("10-sluice.conflist")).unwrap(),
        CONFLIST
    );
    assert_eq!(names(conf.path()), ["10-sluice.conflist"]);
}

#[test]
fn install_creates_missing_directories_and_reports_unreadable_sources() {
    let src = tempfile::tempdir().unwrap();
    let bin = src.path().join("opt/cni/bin");
    let err = install_plugin(&src.path().join("nothing"), &bin).unwrap_err();
    assert!(
        matches!(err, InstallError::Io { op: "reading", .. }),
        "{err}"
    );
    std::fs::write(src.path().join("sluice"), b"x").unwrap();
    install_plugin(&src.path().join("sluice"), &bin).unwrap();
    assert_eq!(names(&bin), ["sluice"]);
}

#[test]
fn a_reader_racing_the_writer_sees_the_old_file_or_the_new_one_never_a_part() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (vec![b'a'; 256 << 10], vec![b'b'; 256 << 10]);
    write_atomic(dir.path(), "f.conflist", &a, 0o644).unwrap();
    let path = dir.path().join("f.conflist");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = std::thread::spawn({
        let stop = stop.clone();
        move || {
            let mut reads = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let got = std::fs::read(&path).expect("always there");
                assert_eq!(got.len(), 256 << 10, "whole");
                assert!(got.iter().all(|c| *c == got[0]), "one version");
                reads += 1;
            }
            reads
        }
    });
    for i in 0..200 {
        write_atomic(
            dir.path(),
            "f.conflist",
            if i % 2 == 0 { &b } else { &a },
            0o644,
        )
        .unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
}

#[test]
fn uninstall_removes_the_conflists_naming_the_plugin_and_nothing_else() {
    let conf = tempfile::tempdir().unwrap();
    let bin = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let bpffs = tempfile::tempdir().unwrap(); // no pins under it: nothing to detach
    let c = conf.path();
    std::fs::write(c.join("10-sluice.conflist"), CONFLIST).unwrap();
    std::fs::write(c.join("05-renamed.conf"), r#"{"name":"x","type":"sluice"}"#).unwrap();
    std::fs::write(c.join(".10-sluice.conflist.Ab12.tmp"), "{\"cniV").unwrap();
    std::fs::write(
        c.join("20-other.conflist"),
        r#"{"name":"o","plugins":[{"type":"bridge"}]}"#,
    )
    .unwrap();
    std::fs::write(c.join("30-broken.conf"), "not json").unwrap();
    std::fs::write(c.join("README"), "sluice").unwrap();
    std::fs::write(bin.path().join("sluice"), b"x").unwrap();
    std::fs::write(bin.path().join("bridge"), b"x").unwrap();
    let registry = state.path().join("registry");
    std::fs::create_dir(&registry).unwrap();
    std::fs::write(registry.join("ep.json"), "{}").unwrap();

    let what = Uninstall {
        bpffs: &bpffs.path().join("sluice"),
        cni_conf_dir: Some(c),
        cni_bin_dir: Some(bin.path()),
        state_dir: Some(&registry),
    };
    let done = uninstall(&what).unwrap();
    assert_eq!(done.files.len(), 5, "{:?}", done.files);
    assert_eq!(names(c), ["20-other.conflist", "30-broken.conf", "README"]);
    assert_eq!(names(bin.path()), ["bridge"]);
    assert!(!registry.exists());
    // Twice: nothing left to do, and no error.
    assert!(uninstall(&what).unwrap().files.is_empty());
}

#[tokio::test]
async fn the_conflist_is_written_only_once_the_agent_is_ready_and_again_if_it_vanishes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src/10-sluice.conflist");
    std::fs::create_dir_all(src.parent().unwrap()).unwrap();
    std::fs::write(&src, CONFLIST).unwrap();
    let conf = dir.path().join("net.d");
    let dest = conf.join("10-sluice.conflist");
    // A socket that answers STATUS as the agent's does.
    let socket = dir.path().join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let server = tokio::spawn(async move {
        loop {
            let (s, _) = listener.accept().await.unwrap();
            let (rd, mut wr) = s.into_split();
            let mut line = String::new();
            tokio::io::BufReader::new(rd)
                .read_line(&mut line)
                .await
                .unwrap();
            wr.write_all(Response::Ok.to_line().unwrap().as_bytes())
                .await
                .unwrap();
        }
    });
    let ready = Ready::default();
    let task = tokio::spawn(write_conflist_when_ready(
        ready.clone(),
        socket,
        src,
        conf.clone(),
        Duration::from_millis(20),
    ));
    let appears = async {
        while !dest.exists() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    ready.set_synced(true);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !dest.exists(),
        "synced but the socket not serving: no conflist"
    );
    ready.set_serving(true);
    tokio::time::timeout(Duration::from_secs(5), appears)
        .await
        .expect("written once ready");
    assert_eq!(std::fs::read_to_string(&dest).unwrap(), CONFLIST);
    std::fs::remove_file(&dest).unwrap();
    let again = async {
        while !dest.exists() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), again)
        .await
        .expect("written again");
    // Not ready any more: the conflist stays.
    ready.set_synced(false);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(dest.exists());
    task.abort();
    server.abort();
}

#[tokio::test]
async fn a_ready_agent_whose_socket_does_not_answer_gets_no_conflist() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("10-sluice.conflist");
    std::fs::write(&src, CONFLIST).unwrap();
    let conf = dir.path().join("net.d");
    let ready = Ready::default();
    ready.set_synced(true);
    ready.set_serving(true);
    let task = tokio::spawn(write_conflist_when_ready(
        ready,
        dir.path().join("no.sock"),
        src,
        conf.clone(),
        Duration::from_millis(10),
    ));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!conf.join("10-sluice.conflist").exists());
    task.abort();
}
