//! Conformance tests for the content store: what a server relying on it may assume.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use kagami_config::Digest;
use kagami_store::{
    Begin, BlobWriter, Inflight, Store, StoreError, StoreEvent, StoreOptions, TagEntry,
};
use kagami_testkit::eventually;
use sha2::Digest as _;

const DEADLINE: Duration = Duration::from_secs(20);

fn sha256(data: &[u8]) -> Digest {
    Digest::sha256_from_bytes(&sha2::Sha256::digest(data))
}

/// Deterministic pseudo-random bytes.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

async fn open(root: &Path) -> Store {
    Store::open(root, StoreOptions::default()).await.unwrap()
}

async fn open_max(root: &Path, max: u64) -> Store {
    Store::open(
        root,
        StoreOptions {
            max_size: Some(max),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

fn writer(store: &Store, d: &Digest, size: Option<u64>) -> BlobWriter {
    match store.begin(d, size).unwrap() {
        Begin::Writer(w) => w,
        Begin::Joined(_) => panic!("expected to be the writer of {d}"),
    }
}

fn joined(store: &Store, d: &Digest) -> Inflight {
    match store.begin(d, None).unwrap() {
        Begin::Joined(i) => i,
        Begin::Writer(_) => panic!("expected to join the write of {d}"),
    }
}

async fn put(store: &Store, data: &[u8]) -> Digest {
    let d = sha256(data);
    let mut w = writer(store, &d, Some(data.len() as u64));
    for c in data.chunks(10_000) {
        w.write(c).await.unwrap();
    }
    assert_eq!(w.commit().await.unwrap(), data.len() as u64);
    d
}

/// Everything a stream yields, and the error it ended with, if any.
async fn drain(s: impl Stream<Item = io::Result<Bytes>>) -> (Vec<u8>, Option<io::Error>) {
    let mut s = std::pin::pin!(s);
    let mut got = Vec::new();
    let r = tokio::time::timeout(DEADLINE, async {
        while let Some(item) = s.next().await {
            match item {
                Ok(b) => got.extend_from_slice(&b),
                Err(e) => return Some(e),
            }
        }
        None
    })
    .await
    .expect("stream did not end in time");
    (got, r)
}

async fn read_blob(store: &Store, d: &Digest) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut h = store.open_blob(d).await.unwrap().expect("blob present");
    let mut v = Vec::new();
    h.file.read_to_end(&mut v).await.unwrap();
    assert_eq!(v.len() as u64, h.size);
    v
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    v.sort();
    v
}

fn blob_path(root: &Path, d: &Digest) -> PathBuf {
    root.join("blobs").join(d.algorithm().name()).join(d.hex())
}

#[tokio::test]
async fn write_commit_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let mut events = store.subscribe();
    let bytes = data(300_000, 1);
    let d = sha256(&bytes);
    assert_eq!(store.blob_size(&d), None);
    assert!(store.open_blob(&d).await.unwrap().is_none());

    let mut w = writer(&store, &d, Some(bytes.len() as u64));
    assert_eq!(store.usage().in_flight, 1);
    for c in bytes.chunks(65_536) {
        w.write(c).await.unwrap();
    }
    assert_eq!(w.written(), bytes.len() as u64);
    // Not visible before commit.
    assert_eq!(store.blob_size(&d), None);
    assert!(!blob_path(dir.path(), &d).exists());
    assert_eq!(w.commit().await.unwrap(), bytes.len() as u64);

    assert_eq!(store.blob_size(&d), Some(bytes.len() as u64));
    assert_eq!(read_blob(&store, &d).await, bytes);
    assert_eq!(std::fs::read(blob_path(dir.path(), &d)).unwrap(), bytes);
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    let u = store.usage();
    assert_eq!((u.bytes, u.blobs, u.in_flight), (bytes.len() as u64, 1, 0));
    assert_eq!(events.try_recv().unwrap(), StoreEvent::Added(d.clone()));

    // A later begin for a complete blob joins it and streams the stored file.
    let i = joined(&store, &d);
    let (got, err) = drain(i.stream(0, None)).await;
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, bytes);
    let (got, err) = drain(i.stream(1000, Some(10))).await;
    assert!(err.is_none());
    assert_eq!(got, &bytes[1000..1010]);
}

#[tokio::test]
async fn empty_and_sha512_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let d = put(&store, b"").await;
    assert_eq!(store.blob_size(&d), Some(0));
    assert!(read_blob(&store, &d).await.is_empty());
    let (got, err) = drain(joined(&store, &d).stream(0, None)).await;
    assert!(got.is_empty() && err.is_none());

    let bytes = data(70_000, 2);
    let hex: String = sha2::Sha512::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let d512: Digest = format!("sha512:{hex}").parse().unwrap();
    let mut w = writer(&store, &d512, None);
    w.write(&bytes).await.unwrap();
    w.commit().await.unwrap();
    assert_eq!(read_blob(&store, &d512).await, bytes);
    assert!(blob_path(dir.path(), &d512).is_file());
}

#[tokio::test]
async fn digest_mismatch_stores_nothing_and_fails_followers() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let bytes = data(500_000, 3);
    let claimed = sha256(b"something else");
    let mut w = writer(&store, &claimed, None);
    let follower = tokio::spawn(drain(joined(&store, &claimed).stream(0, None)));
    let own = tokio::spawn(drain(w.follow().stream(0, None)));
    for c in bytes.chunks(65_536) {
        w.write(c).await.unwrap();
    }
    // A follower that has caught up holds everything but the last byte...
    let mut s = Box::pin(w.follow().stream(0, None));
    let mut got = Vec::new();
    while got.len() < bytes.len() - 1 {
        let chunk = tokio::time::timeout(DEADLINE, s.next()).await.unwrap();
        got.extend_from_slice(&chunk.unwrap().unwrap());
    }
    assert_eq!(got, &bytes[..bytes.len() - 1]);
    match w.commit().await {
        Err(StoreError::DigestMismatch { expected, actual }) => {
            assert_eq!(expected, claimed);
            assert_eq!(actual, sha256(&bytes));
        }
        other => panic!("expected a digest mismatch, got {other:?}"),
    }
    // ...and never gets it: the stream ends with the mismatch.
    let end = tokio::time::timeout(DEADLINE, s.next()).await.unwrap();
    let err = end.expect("an error, not the end").unwrap_err();
    assert!(err.to_string().contains("digest mismatch"), "{err}");
    assert!(
        tokio::time::timeout(DEADLINE, s.next())
            .await
            .unwrap()
            .is_none()
    );
    for f in [follower, own] {
        let (got, err) = f.await.unwrap();
        let err = err.expect("follower must see an error");
        assert!(err.to_string().contains("digest mismatch"), "{err}");
        assert!(
            got.len() < bytes.len(),
            "a follower got the whole wrong blob"
        );
        assert_eq!(got, &bytes[..got.len()]);
    }
    assert_eq!(store.blob_size(&claimed), None);
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    assert!(files_in(&dir.path().join("blobs/sha256")).is_empty());
    assert_eq!(store.usage().in_flight, 0);
    // The digest can be written again.
    let _ = writer(&store, &claimed, None);
}

#[tokio::test]
async fn size_mismatch_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let bytes = data(1000, 4);
    let d = sha256(&bytes);
    // The right bytes, but the announced size was wrong (short): caught at commit.
    let mut w = writer(&store, &d, Some(1001));
    w.write(&bytes).await.unwrap();
    let e = w.commit().await.unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::SizeMismatch {
                expected: 1001,
                actual: 1000,
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(store.blob_size(&d), None);
    assert!(files_in(&dir.path().join("tmp")).is_empty());
}

#[tokio::test]
async fn writing_past_the_expected_size_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let bytes = data(1000, 4);
    let d = sha256(&bytes);
    let mut w = writer(&store, &d, Some(600));
    let follower = w.follow();
    w.write(&bytes[..500]).await.unwrap();
    let e = w.write(&bytes[500..]).await.unwrap_err();
    assert!(
        matches!(
            e,
            StoreError::SizeMismatch {
                expected: 600,
                actual: 1000,
                ..
            }
        ),
        "{e}"
    );
    let (got, err) = drain(follower.stream(0, None)).await;
    assert!(err.unwrap().to_string().contains("size mismatch"));
    assert!(got.len() < 500);
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    assert_eq!(store.usage().in_flight, 0);
}

#[test]
fn handles_are_send_and_sync() {
    fn send_sync<T: Send + Sync + 'static>() {}
    fn send<T: Send + 'static>() {}
    send_sync::<Store>();
    send_sync::<Inflight>();
    send_sync::<StoreError>();
    send::<BlobWriter>();
    send::<Begin>();
    send::<kagami_store::BlobHandle>();
}

#[tokio::test]
async fn dropping_a_writer_aborts() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let bytes = data(200_000, 5);
    let d = sha256(&bytes);
    let mut w = writer(&store, &d, None);
    let follower = joined(&store, &d);
    w.write(&bytes[..100_000]).await.unwrap();
    assert_eq!(files_in(&dir.path().join("tmp")).len(), 1);
    let reading = tokio::spawn(drain(follower.stream(0, None)));
    drop(w);
    let (got, err) = reading.await.unwrap();
    let err = err.expect("follower must see an error");
    assert!(err.to_string().contains("abandoned"), "{err}");
    assert!(got.len() < 100_000);
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    assert_eq!(store.usage().in_flight, 0);
    assert_eq!(store.blob_size(&d), None);
    // A new write of the same digest starts afresh and succeeds.
    put(&store, &bytes).await;
    assert_eq!(read_blob(&store, &d).await, bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_followers_share_one_write() {
    const SIZE: usize = 20 * 1024 * 1024;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let bytes = std::sync::Arc::new(data(SIZE, 6));
    let d = sha256(&bytes);
    let mut w = writer(&store, &d, Some(SIZE as u64));

    let mut tasks = Vec::new();
    let spawn_follower = |tasks: &mut Vec<_>, offset: u64| {
        let i = joined(&store, &d);
        assert_eq!(i.expected_size(), Some(SIZE as u64));
        let bytes = bytes.clone();
        tasks.push(tokio::spawn(async move {
            // Compare as we go: never hold 20 copies of 20 MB.
            let mut s = std::pin::pin!(i.stream(offset, None));
            let mut pos = offset as usize;
            while let Some(chunk) = s.next().await {
                let chunk = chunk.expect("follower error");
                assert!(chunk.len() <= kagami_store::CHUNK);
                assert!(
                    chunk[..] == bytes[pos..pos + chunk.len()],
                    "wrong bytes at {pos}"
                );
                pos += chunk.len();
            }
            pos
        }));
    };
    for n in 0..10 {
        spawn_follower(&mut tasks, if n == 9 { 12_345 } else { 0 });
    }
    let mut written = 0;
    for (n, c) in bytes.chunks(256 * 1024).enumerate() {
        w.write(c).await.unwrap();
        written += c.len();
        // Late joiners start while the write is under way.
        if n % 8 == 7 && tasks.len() < 20 {
            spawn_follower(&mut tasks, 0);
        }
    }
    while tasks.len() < 20 {
        spawn_follower(&mut tasks, 0);
    }
    assert_eq!(written, SIZE);
    assert_eq!(store.usage().in_flight, 1);
    w.commit().await.unwrap();
    for t in tasks {
        let end = tokio::time::timeout(DEADLINE, t).await.unwrap().unwrap();
        assert_eq!(end, SIZE);
    }
    assert_eq!(store.usage().in_flight, 0);
    assert_eq!(store.blob_size(&d), Some(SIZE as u64));
}

#[tokio::test]
async fn range_follower_gets_its_slice_as_bytes_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let bytes = data(1_000_000, 7);
    let d = sha256(&bytes);
    let mut w = writer(&store, &d, None);
    let i = joined(&store, &d);
    let early = tokio::spawn(drain(i.stream(300_000, Some(200_000))));
    let tail = tokio::spawn(drain(i.stream(900_000, None)));
    w.write(&bytes[..600_000]).await.unwrap();
    // The range ends before the written data does: it completes before the rest is written.
    let (got, err) = early.await.unwrap();
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, &bytes[300_000..500_000]);
    assert!(!tail.is_finished());
    w.write(&bytes[600_000..]).await.unwrap();
    w.commit().await.unwrap();
    let (got, err) = tail.await.unwrap();
    assert!(err.is_none(), "{err:?}");
    assert_eq!(got, &bytes[900_000..]);
    // A range past the end of the committed blob is an error, not a short answer.
    let (_, err) = drain(i.stream(999_000, Some(5000))).await;
    assert_eq!(err.unwrap().kind(), io::ErrorKind::UnexpectedEof);
}

#[tokio::test]
async fn last_byte_is_withheld_until_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let bytes = data(400_000, 8);
    let d = sha256(&bytes);
    let mut w = writer(&store, &d, Some(bytes.len() as u64));
    w.write(&bytes).await.unwrap();
    let mut s = Box::pin(w.follow().stream(0, None));
    let mut got = Vec::new();
    while got.len() < bytes.len() - 1 {
        let chunk = tokio::time::timeout(DEADLINE, s.next()).await.unwrap();
        got.extend_from_slice(&chunk.unwrap().unwrap());
    }
    assert_eq!(got.len(), bytes.len() - 1);
    // Everything is written, but the last byte waits for verification.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), s.next())
            .await
            .is_err(),
        "the last byte was yielded before commit"
    );
    let commit = tokio::spawn(w.commit());
    let last = tokio::time::timeout(DEADLINE, s.next()).await.unwrap();
    got.extend_from_slice(&last.unwrap().unwrap());
    assert!(
        tokio::time::timeout(DEADLINE, s.next())
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(got, bytes);
    commit.await.unwrap().unwrap();
}

#[tokio::test]
async fn restart_keeps_blobs_tags_and_media_types() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let manifest = br#"{"schemaVersion":2}"#;
    let layer = data(123_456, 9);
    let entry = TagEntry {
        digest: sha256(manifest),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        fetched_at: SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 42),
    };
    {
        let store = open(root).await;
        put(&store, manifest).await;
        put(&store, &layer).await;
        store
            .put_media_type(&entry.digest, &entry.media_type)
            .unwrap();
        store
            .put_tag("docker.io", "library/alpine", "3.20", entry.clone())
            .unwrap();
        // A write that never finishes: as if the process died. (Its temp file is put back
        // after the writer is dropped: a leaked writer would keep the store's lock.)
        let other = data(5000, 10);
        let mut w = writer(&store, &sha256(&other), None);
        w.write(&other).await.unwrap();
        let tmp = files_in(&root.join("tmp"));
        assert_eq!(tmp.len(), 1);
        let leftover = root.join("tmp").join(&tmp[0]);
        let saved = std::fs::read(&leftover).unwrap();
        drop(w);
        drop(store);
        std::fs::write(&leftover, saved).unwrap();
    }
    let store = open(root).await;
    assert!(files_in(&root.join("tmp")).is_empty());
    assert_eq!(read_blob(&store, &sha256(manifest)).await, manifest);
    assert_eq!(read_blob(&store, &sha256(&layer)).await, layer);
    assert_eq!(store.usage().blobs, 2);
    assert_eq!(store.usage().bytes, (manifest.len() + layer.len()) as u64);
    assert_eq!(
        store.media_type(&entry.digest).as_deref(),
        Some(entry.media_type.as_str())
    );
    assert_eq!(
        store.get_tag("docker.io", "library/alpine", "3.20"),
        Some(entry)
    );
    assert_eq!(store.list_tags("docker.io", "library/alpine"), ["3.20"]);
    assert_eq!(store.blob_size(&sha256(&data(5000, 10))), None);
}

#[tokio::test]
async fn open_cleans_up_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let good = data(4096, 11);
    let d = {
        let store = open(root).await;
        put(&store, &good).await
    };
    // What a kill -9 can leave: temp files of unfinished writes, and stray files in blobs/.
    let half = data(2000, 12);
    std::fs::write(
        root.join("tmp")
            .join(format!("sha256-{}.1.0", sha256(&half).hex())),
        &half[..1000],
    )
    .unwrap();
    std::fs::write(root.join("tmp/evicted.1.3"), b"x").unwrap();
    std::fs::create_dir(root.join("tmp/leftover-dir")).unwrap();
    let blobs = root.join("blobs/sha256");
    let upper = d.hex().to_uppercase();
    std::fs::write(blobs.join("not-a-digest"), b"x").unwrap();
    std::fs::write(blobs.join(format!("{}.partial", d.hex())), b"x").unwrap();
    std::fs::write(blobs.join(&upper), b"x").unwrap();
    std::fs::write(blobs.join(&d.hex()[..63]), b"x").unwrap();
    std::fs::write(root.join("tags/garbage.json"), b"{").unwrap();

    let store = open(root).await;
    assert!(files_in(&root.join("tmp")).is_empty());
    assert_eq!(files_in(&blobs), [d.hex()]);
    assert!(files_in(&root.join("tags")).is_empty());
    assert_eq!(store.usage().blobs, 1);
    assert_eq!(store.blob_size(&sha256(&half)), None);
    assert_eq!(read_blob(&store, &d).await, good);
}

const CHILD_ENV: &str = "KAGAMI_STORE_TEST_CHILD_ROOT";

/// Not a test on its own: the child process of `kill_9_mid_write_leaves_nothing_visible`.
#[tokio::test]
async fn child_writer_for_kill_test() {
    let Ok(root) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = open(Path::new(&root)).await;
    let bytes = data(2_000_000, 13);
    let mut w = writer(&store, &sha256(&bytes), None);
    w.write(&bytes[..1_000_000]).await.unwrap();
    // Wait to be killed (bounded, in case the parent is gone).
    tokio::time::sleep(Duration::from_secs(60)).await;
}

#[tokio::test]
async fn kill_9_mid_write_leaves_nothing_visible() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let bytes = data(2_000_000, 13);
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        // The test's name in this binary (module `store` of tests/tests.rs).
        .args([
            "store::child_writer_for_kill_test",
            "--exact",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, root)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let tmp = root.join("tmp");
    eventually(DEADLINE, "the child to write its temp file", async || {
        let written: u64 = std::fs::read_dir(&tmp)
            .map(|rd| rd.map(|e| e.unwrap().metadata().unwrap().len()).sum())
            .unwrap_or(0);
        if written >= 1_000_000 {
            return true;
        }
        assert!(child.try_wait().unwrap().is_none(), "child exited early");
        false
    })
    .await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert_eq!(files_in(&tmp).len(), 1);

    let store = open(root).await;
    assert!(files_in(&tmp).is_empty());
    assert!(files_in(&root.join("blobs/sha256")).is_empty());
    assert_eq!(store.blob_size(&sha256(&bytes)), None);
    assert_eq!(store.usage(), Default::default());
}

#[tokio::test]
async fn lru_eviction_spares_pinned_and_recent_blobs() {
    let dir = tempfile::tempdir().unwrap();
    // Room for three blobs and the write in flight (which counts in the limit).
    let store = open_max(dir.path(), 4000).await;
    let mut events = store.subscribe();
    let [a, b, c, d, e] = [20, 21, 22, 23, 24].map(|s| data(1000, s));
    let da = put(&store, &a).await;
    let db = put(&store, &b).await;
    let dc = put(&store, &c).await;
    assert_eq!(store.usage().bytes, 3000);
    assert_eq!(store.usage().evictions, 0);
    // Pin B, then use A and C: B is the least recently used, then A, then C.
    let pinned = store.open_blob(&db).await.unwrap().unwrap();
    drop(store.open_blob(&da).await.unwrap());
    drop(store.open_blob(&dc).await.unwrap());
    // A write in flight is never a candidate either.
    let f = data(1000, 25);
    let df = sha256(&f);
    let mut wf = writer(&store, &df, None);
    wf.write(&f).await.unwrap();

    let dd = put(&store, &d).await;
    // Over the limit: B is least recently used but pinned, so A goes.
    assert_eq!(store.blob_size(&da), None);
    assert!(!blob_path(dir.path(), &da).exists());
    for x in [&db, &dc, &dd] {
        assert!(store.blob_size(x).is_some(), "{x} was evicted");
    }
    let u = store.usage();
    assert_eq!(
        (u.bytes, u.blobs, u.evictions, u.in_flight),
        (3000, 3, 1, 1)
    );
    let evs: Vec<_> = std::iter::from_fn(|| events.try_recv().ok()).collect();
    assert!(evs.contains(&StoreEvent::Removed(da.clone())), "{evs:?}");

    // The pinned handle still reads its blob; once dropped, B is the next to go.
    let mut got = Vec::new();
    let mut pinned = pinned;
    tokio::io::AsyncReadExt::read_to_end(&mut pinned.file, &mut got)
        .await
        .unwrap();
    assert_eq!(got, b);
    drop(pinned);
    let de = put(&store, &e).await;
    assert_eq!(store.blob_size(&db), None);
    for x in [&dc, &dd, &de] {
        assert!(store.blob_size(x).is_some(), "{x} was evicted");
    }
    // The in-flight write was untouched and still commits; it was counted all along, so
    // nothing more goes for it.
    wf.commit().await.unwrap();
    assert_eq!(read_blob(&store, &df).await, f);
    assert!(store.blob_size(&dc).is_some());
    assert_eq!(store.usage().bytes, 4000);
    assert_eq!(store.usage().tmp_bytes, 0);
    assert_eq!(store.usage().evictions, 2);
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    assert_eq!(files_in(&dir.path().join("blobs/sha256")).len(), 4);
}

#[tokio::test]
async fn a_committed_blob_being_followed_is_not_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_max(dir.path(), 1500).await;
    let old = data(1000, 30);
    let big = data(1000, 31);
    let dold = put(&store, &old).await;
    let dbig = sha256(&big);
    let mut w = writer(&store, &dbig, None);
    let follower = w.follow();
    w.write(&big).await.unwrap();
    w.commit().await.unwrap();
    // The follower (still alive, not yet read) pins the new blob; the old one went.
    assert_eq!(store.blob_size(&dold), None);
    assert_eq!(store.blob_size(&dbig), Some(1000));
    let (got, err) = drain(follower.stream(0, None)).await;
    assert!(err.is_none());
    assert_eq!(got, big);
}

#[tokio::test]
async fn lru_order_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let blobs: Vec<Vec<u8>> = (40..43).map(|s| data(1000, s)).collect();
    let ds = {
        let store = open(root).await;
        let mut ds = Vec::new();
        for b in &blobs {
            ds.push(put(&store, b).await);
        }
        ds
    };
    // Make the first blob the most recently used by its mtime, the second the least.
    let t0 = SystemTime::now() - Duration::from_secs(3600);
    for (d, age) in ds.iter().zip([10, 30, 20]) {
        let f = std::fs::File::options()
            .write(true)
            .open(blob_path(root, d))
            .unwrap();
        f.set_modified(t0 - Duration::from_secs(age)).unwrap();
    }
    // Reopen under a limit that fits two: the second (oldest) is evicted at open.
    let store = open_max(root, 2000).await;
    assert_eq!(store.blob_size(&ds[1]), None);
    assert!(store.blob_size(&ds[0]).is_some() && store.blob_size(&ds[2]).is_some());
    assert_eq!(store.usage().evictions, 1);
    // Using a blob updates its mtime.
    drop(store.open_blob(&ds[2]).await.unwrap());
    let m = std::fs::metadata(blob_path(root, &ds[2]))
        .unwrap()
        .modified()
        .unwrap();
    assert!(m > t0);
}

/// Writes 2 MB into a store whose disk fills up, and checks the failure is clean.
async fn check_disk_full(store: &Store, root: &Path) {
    let bytes = data(2 * 1024 * 1024, 50);
    let d = sha256(&bytes);
    let mut w = writer(store, &d, None);
    let follower = tokio::spawn(drain(w.follow().stream(0, None)));
    let mut err = None;
    for c in bytes.chunks(64 * 1024) {
        if let Err(e) = w.write(c).await {
            err = Some(e);
            break;
        }
    }
    let err = err.expect("writing 2 MB into 1 MB must fail");
    assert!(matches!(err, StoreError::Full { .. }), "{err:?}");
    assert!(
        err.to_string().starts_with("no space left writing "),
        "{err}"
    );
    // The writer refuses more data and cannot commit.
    assert!(matches!(
        w.write(b"x").await,
        Err(StoreError::Aborted { .. })
    ));
    assert!(matches!(w.commit().await, Err(StoreError::Aborted { .. })));
    let (got, ferr) = follower.await.unwrap();
    assert!(ferr.is_some(), "follower must see an error");
    assert!(got.len() < bytes.len());
    assert!(files_in(&root.join("tmp")).is_empty());
    assert_eq!(store.blob_size(&d), None);
    let u = store.usage();
    assert_eq!((u.blobs, u.in_flight), (1, 0));
    // The store is still consistent and usable.
    let small = data(10_000, 51);
    let ds = put(store, &small).await;
    assert_eq!(read_blob(store, &ds).await, small);
}

#[tokio::test]
async fn disk_full_fails_cleanly_on_a_small_tmpfs() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    std::fs::create_dir(&root).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(&root)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _guard = mounted.then(|| Unmount(root.clone()));
    let store = open(&root).await;
    put(&store, &data(1000, 52)).await;
    if !mounted {
        // No tmpfs here (not root, or no mount permission): make the disk "fill" at 1 MB.
        eprintln!("disk_full: tmpfs mount failed, injecting ENOSPC after 1 MiB instead");
        store.inject_write_failure_after(Some(1024 * 1024));
    }
    check_disk_full(&store, &root).await;
}

#[tokio::test]
async fn disk_full_by_injection() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    put(&store, &data(1000, 52)).await;
    store.inject_write_failure_after(Some(1024 * 1024));
    check_disk_full(&store, dir.path()).await;
}

#[tokio::test]
async fn tag_index_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let e = |s: &[u8], secs| TagEntry {
        digest: sha256(s),
        media_type: "application/vnd.oci.image.index.v1+json".into(),
        fetched_at: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
    };
    assert_eq!(store.get_tag("docker.io", "library/alpine", "3.20"), None);
    assert!(store.list_tags("docker.io", "library/alpine").is_empty());
    for (reg, repo, tag, entry) in [
        ("docker.io", "library/alpine", "3.20", e(b"a", 1)),
        ("docker.io", "library/alpine", "latest", e(b"b", 2)),
        ("docker.io", "library/alpine", "3.19", e(b"c", 3)),
        ("docker.io", "library/alpine/sub", "x", e(b"d", 4)),
        ("127.0.0.1:5000", "library/alpine", "3.20", e(b"e", 5)),
        ("r", "../../etc", "..", e(b"f", 6)),
    ] {
        store.put_tag(reg, repo, tag, entry).unwrap();
    }
    // Overwrite.
    store
        .put_tag("docker.io", "library/alpine", "latest", e(b"g", 7))
        .unwrap();
    let check = |store: &Store| {
        assert_eq!(
            store.list_tags("docker.io", "library/alpine"),
            ["3.19", "3.20", "latest"]
        );
        assert_eq!(store.list_tags("docker.io", "library/alpine/sub"), ["x"]);
        assert_eq!(
            store.list_tags("127.0.0.1:5000", "library/alpine"),
            ["3.20"]
        );
        assert_eq!(
            store.get_tag("docker.io", "library/alpine", "latest"),
            Some(e(b"g", 7))
        );
        assert_eq!(
            store.get_tag("127.0.0.1:5000", "library/alpine", "3.20"),
            Some(e(b"e", 5))
        );
        assert_eq!(store.get_tag("r", "../../etc", ".."), Some(e(b"f", 6)));
        assert_eq!(store.get_tag("docker.io", "library/alpine", "nope"), None);
    };
    check(&store);
    // Only flat files in tags/, none written outside the root.
    assert_eq!(files_in(&dir.path().join("tags")).len(), 6);
    assert!(files_in(&dir.path().join("tmp")).is_empty());
    drop(store);
    let store = open(dir.path()).await;
    check(&store);

    let err = store.put_tag("", "a", "b", e(b"x", 1)).unwrap_err();
    assert_eq!(err.to_string(), "invalid registry \"\": it is empty");
    let d = sha256(b"m");
    assert!(store.put_media_type(&d, "").is_err());
    assert!(store.put_media_type(&d, "a\nb").is_err());
    store
        .put_media_type(&d, "application/vnd.oci.image.manifest.v1+json")
        .unwrap();
    store
        .put_media_type(&d, "application/vnd.docker.distribution.manifest.v2+json")
        .unwrap();
    drop(store);
    assert_eq!(
        open(dir.path()).await.media_type(&d).as_deref(),
        Some("application/vnd.docker.distribution.manifest.v2+json")
    );
}

#[tokio::test]
async fn error_messages_name_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let err = Store::open(&file, StoreOptions::default())
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(msg.starts_with("create directory "), "{msg}");
    assert!(msg.contains("a-file"), "{msg}");
}

#[tokio::test]
async fn put_bytes_writes_once_and_waits_for_a_concurrent_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let bytes = data(10_000, 41);
    let d = sha256(&bytes);
    assert!(
        store.put_bytes(&d, &bytes).await.unwrap(),
        "first put writes"
    );
    assert!(
        !store.put_bytes(&d, &bytes).await.unwrap(),
        "second put finds it"
    );
    assert_eq!(read_blob(&store, &d).await, bytes);

    // A concurrent write that fails: finished() says so without reading the blob, and
    // put_bytes then writes the blob itself.
    let other = data(5_000, 42);
    let d2 = sha256(&other);
    let mut w = writer(&store, &d2, None);
    w.write(&other[..100]).await.unwrap();
    let follower = joined(&store, &d2);
    let waiter = tokio::spawn(async move { follower.finished().await });
    drop(w);
    assert!(
        !waiter.await.unwrap(),
        "an abandoned write is not finished well"
    );
    assert!(store.put_bytes(&d2, &other).await.unwrap());
    assert!(
        joined(&store, &d2).finished().await,
        "a stored blob is finished"
    );
    // Wrong bytes are refused like any write.
    let d3 = sha256(b"right");
    assert!(store.put_bytes(&d3, b"wrong").await.is_err());
    assert_eq!(store.blob_size(&d3), None);
}

/// Followers take recent bytes from the writer's in-memory window and older ones from the
/// file: a follower that joins late (its start long dropped from the window) and one that
/// starts at once both get every byte, across the boundary between the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_read_from_memory_and_from_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let len = kagami_store::WINDOW * 3 + 12_345;
    let bytes = data(len, 11);
    let d = sha256(&bytes);
    let mut w = writer(&store, &d, Some(len as u64));
    let early = tokio::spawn(drain(w.follow().stream(0, None)));
    let (first, rest) = bytes.split_at(kagami_store::WINDOW * 2 + 7);
    for c in first.chunks(100_000) {
        w.write_chunks(vec![Bytes::copy_from_slice(c)])
            .await
            .unwrap();
    }
    // This one starts at 0, which is on disk and no longer in memory, and reads on into
    // the window and past it as the write goes on.
    let late = tokio::spawn(drain(joined(&store, &d).stream(0, None)));
    let ranged = tokio::spawn(drain(
        joined(&store, &d).stream(100, Some(len as u64 - 200)),
    ));
    let mut chunks: Vec<Bytes> = rest.chunks(70_001).map(Bytes::copy_from_slice).collect();
    let tail = chunks.split_off(chunks.len() / 2);
    w.write_chunks(chunks).await.unwrap();
    w.write_chunks(tail).await.unwrap();
    w.commit().await.unwrap();
    for (name, t) in [("early", early), ("late", late)] {
        let (got, err) = tokio::time::timeout(DEADLINE, t).await.unwrap().unwrap();
        assert!(err.is_none(), "{name}: {err:?}");
        assert!(got == bytes, "{name} follower got different bytes");
    }
    let (got, err) = tokio::time::timeout(DEADLINE, ranged)
        .await
        .unwrap()
        .unwrap();
    assert!(err.is_none(), "{err:?}");
    assert!(got == bytes[100..len - 100]);
}

/// A write whose future is dropped half-way leaves the writer unusable: the next write
/// fails, followers get an error, and nothing is stored.
#[tokio::test]
async fn a_cancelled_write_abandons_the_blob() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let bytes = data(3_000_000, 12);
    let d = sha256(&bytes);
    let mut w = writer(&store, &d, None);
    let follower = w.follow();
    w.write(&bytes[..1_000_000]).await.unwrap();
    {
        // Polled once (the chunk is published and handed to the blocking threads), then
        // dropped.
        let fut = w.write(&bytes[1_000_000..2_000_000]);
        futures_util::pin_mut!(fut);
        let waker = futures_util::task::noop_waker();
        let _ = fut
            .as_mut()
            .poll(&mut std::task::Context::from_waker(&waker));
    }
    assert!(w.write(&bytes[2_000_000..]).await.is_err());
    assert!(w.commit().await.is_err());
    let (_, err) = tokio::time::timeout(DEADLINE, drain(follower.stream(0, None)))
        .await
        .unwrap();
    assert!(err.is_some(), "the follower must see the failure");
    assert!(store.open_blob(&d).await.unwrap().is_none());
    assert!(!blob_path(dir.path(), &d).exists());
}

#[tokio::test]
async fn a_second_open_of_the_same_root_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let first = open(&root).await;
    let err = Store::open(&root, StoreOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Locked { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&root.display().to_string()), "{msg}");
    assert!(msg.contains("in use by another process"), "{msg}");
    // The lock goes with the store.
    drop(first);
    open(&root).await;
}

#[tokio::test]
async fn files_and_directories_are_private_to_the_store_user() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    // A store made by an older version with world-readable directories.
    std::fs::create_dir_all(&root).unwrap();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let store = open(&root).await;
    let bytes = data(1000, 77);
    let d = put(&store, &bytes).await;
    store
        .put_media_type(&d, "application/vnd.oci.image.manifest.v1+json")
        .unwrap();
    store
        .put_tag(
            "registry.example.test",
            "team/app",
            "1",
            TagEntry {
                digest: d.clone(),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                fetched_at: SystemTime::now(),
            },
        )
        .unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&root), 0o700);
    for sub in [
        "blobs",
        "blobs/sha256",
        "tmp",
        "tags",
        "meta",
        "meta/sha256",
    ] {
        assert_eq!(mode(&root.join(sub)), 0o700, "{sub}");
    }
    assert_eq!(mode(&blob_path(&root, &d)), 0o600);
    assert_eq!(mode(&root.join("meta/sha256").join(d.hex())), 0o600);
    let tag = std::fs::read_dir(root.join("tags"))
        .unwrap()
        .next()
        .unwrap();
    assert_eq!(mode(&tag.unwrap().path()), 0o600);
}

#[tokio::test]
async fn writes_in_flight_count_in_the_size_limit() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = open_max(&root, 1024 * 1024).await;
    // A stored blob is evicted to make room for a write in flight.
    let old = put(&store, &data(600 * 1024, 1)).await;
    let big = data(2 * 1024 * 1024, 2);
    let d = sha256(&big);
    let mut w = writer(&store, &d, None);
    w.write(&big[..512 * 1024]).await.unwrap();
    assert_eq!(
        store.blob_size(&old),
        None,
        "evicted for the write in flight"
    );
    assert_eq!(store.usage().tmp_bytes, 512 * 1024);
    // The write cannot go past the limit: it fails, its temp file goes, nothing is stored.
    w.write(&big[512 * 1024..1024 * 1024]).await.unwrap();
    let err = w.write(&big[1024 * 1024..]).await.unwrap_err();
    assert!(matches!(err, StoreError::OverBudget { .. }), "{err}");
    assert!(err.to_string().contains("1048576"), "{err}");
    drop(w);
    assert_eq!(files_in(&root.join("tmp")), Vec::<String>::new());
    let u = store.usage();
    assert_eq!((u.bytes, u.tmp_bytes, u.blobs), (0, 0, 0));
    assert_eq!(store.blob_size(&d), None);
    // A blob that fits is stored and its bytes move from tmp_bytes to bytes.
    let small = put(&store, &data(100_000, 3)).await;
    let u = store.usage();
    assert_eq!((u.bytes, u.tmp_bytes), (100_000, 0));
    assert_eq!(store.blob_size(&small), Some(100_000));
}

#[tokio::test]
async fn a_separate_write_does_not_join_one_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let bytes = data(300_000, 9);
    let d = sha256(&bytes);
    // A stalled write of the blob (another registry's fetch) ...
    let mut stalled = writer(&store, &d, None);
    stalled.write(&bytes[..1000]).await.unwrap();
    // ... does not hold up a separate one, which commits on its own.
    let Begin::Writer(mut w) = store.begin_separate(&d, Some(300_000)).unwrap() else {
        panic!("a separate write must not join");
    };
    w.write(&bytes).await.unwrap();
    w.commit().await.unwrap();
    assert_eq!(read_blob(&store, &d).await, bytes);
    drop(stalled);
    assert_eq!(
        read_blob(&store, &d).await,
        bytes,
        "the abandoned write removed nothing"
    );
    assert_eq!(store.usage().tmp_bytes, 0);
}

/// Eviction by age: a blob whose last use (its file's modification time across a restart)
/// is older than the age goes; a recent one and a pinned old one (an open handle) stay.
#[tokio::test]
async fn blobs_unused_for_the_age_are_evicted_but_never_pinned_ones() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let (old, old_pinned, recent) = {
        let store = open(&root).await;
        let old = put(&store, &data(10_000, 1)).await;
        let old_pinned = put(&store, &data(20_000, 2)).await;
        let recent = put(&store, &data(30_000, 3)).await;
        (old, old_pinned, recent)
    };
    let two_days_ago = SystemTime::now() - Duration::from_secs(2 * 86_400);
    for d in [&old, &old_pinned] {
        std::fs::File::options()
            .write(true)
            .open(blob_path(&root, d))
            .unwrap()
            .set_modified(two_days_ago)
            .unwrap();
    }
    let store = open(&root).await;
    assert_eq!(store.usage().blobs, 3);
    // Two were last used two days ago: none is three days old.
    assert_eq!(
        store
            .evict_unused_for(Duration::from_secs(3 * 86_400))
            .await,
        (0, 0)
    );
    // Opening a blob is a use, and the handle pins it.
    let mut handle = store.open_blob(&old_pinned).await.unwrap().unwrap();
    let (n, bytes) = store.evict_unused_for(Duration::from_secs(86_400)).await;
    assert_eq!((n, bytes), (1, 10_000), "only the old unpinned blob");
    assert!(!blob_path(&root, &old).exists());
    assert!(store.open_blob(&old).await.unwrap().is_none());
    assert!(store.open_blob(&recent).await.unwrap().is_some());
    // With age zero every unpinned blob goes: the recent one, not the pinned one.
    let (n, _) = store.evict_unused_for(Duration::ZERO).await;
    assert_eq!(n, 1);
    assert!(
        blob_path(&root, &old_pinned).exists(),
        "the pinned blob stays"
    );
    let mut buf = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut handle.file, &mut buf)
        .await
        .unwrap();
    assert_eq!(buf.len(), 20_000);
    assert_eq!(store.usage().blobs, 1);
}

/// Digests pinned by the policy (`set_pinned`) survive the size bound and the age, and are
/// evicted normally once unpinned.
#[tokio::test]
async fn policy_pinned_blobs_survive_size_and_age_eviction() {
    let dir = tempfile::tempdir().unwrap();
    // Room for two blobs (a write in flight counts).
    let store = open_max(dir.path(), 2000).await;
    let [a, b, c, d] = [40, 41, 42, 43].map(|s| data(1000, s));
    let da = put(&store, &a).await;
    let db = put(&store, &b).await;
    // A is the least recently used, and pinned; a digest not (yet) stored may be named.
    let absent = sha256(b"not stored yet");
    store.set_pinned([da.clone(), absent.clone()].into_iter().collect());
    assert!(store.is_pinned(&da) && store.is_pinned(&absent) && !store.is_pinned(&db));
    let dc = put(&store, &c).await;
    let dd = put(&store, &d).await;
    // Over the limit twice: B and then C made room, never A.
    assert_eq!(read_blob(&store, &da).await, a);
    assert_eq!(store.blob_size(&db), None);
    assert_eq!(store.blob_size(&dc), None);
    assert!(store.blob_size(&dd).is_some());
    // By age: everything unused for zero seconds goes, but A.
    let (n, _) = store.evict_unused_for(Duration::ZERO).await;
    assert_eq!(n, 1, "D only");
    assert_eq!(store.digests(), vec![da.clone()]);
    // Unpinned, it is an ordinary blob again.
    store.set_pinned(Default::default());
    let (n, bytes) = store.evict_unused_for(Duration::ZERO).await;
    assert_eq!((n, bytes), (1, 1000));
    assert!(!blob_path(dir.path(), &da).exists());
}

/// `remove` (purge) takes tags and blobs out together and announces the blobs, or changes
/// nothing when one of the blobs is read, written or pinned by the policy.
#[tokio::test]
async fn remove_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path()).await;
    let mut events = store.subscribe();
    let (a, b) = (data(1000, 50), data(2000, 51));
    let (da, db) = (put(&store, &a).await, put(&store, &b).await);
    let entry = TagEntry {
        digest: da.clone(),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        fetched_at: SystemTime::now(),
    };
    let mut changes = store.changes();
    changes.mark_unchanged();
    store
        .put_tag("r.example", "team/app", "1", entry.clone())
        .unwrap();
    assert!(changes.has_changed().unwrap(), "a tag is a change");
    store.put_tag("r.example", "team/app", "2", entry).unwrap();
    changes.mark_unchanged();
    let tag1 = [(
        "r.example".to_string(),
        "team/app".to_string(),
        "1".to_string(),
    )];
    let both = [da.clone(), db.clone()];

    // Read right now: refused, nothing changed.
    let handle = store.open_blob(&db).await.unwrap().unwrap();
    let e = store.remove(&tag1, &both).unwrap_err();
    assert!(
        matches!(&e, StoreError::InUse { digest, .. } if *digest == db),
        "{e}"
    );
    assert!(e.to_string().contains("being read"), "{e}");
    drop(handle);
    // Written right now: refused.
    let c = data(10, 52);
    let dc = sha256(&c);
    let w = writer(&store, &dc, None);
    let e = store.remove(&tag1, &[da.clone(), dc.clone()]).unwrap_err();
    assert!(e.to_string().contains("being written"), "{e}");
    drop(w);
    // Pinned by the policy: refused.
    store.set_pinned([da.clone()].into_iter().collect());
    let e = store.remove(&tag1, &both).unwrap_err();
    assert!(e.to_string().contains("pinned"), "{e}");
    store.set_pinned(Default::default());
    assert_eq!(store.list_tags("r.example", "team/app"), ["1", "2"]);
    assert_eq!(store.usage().blobs, 2);

    let removed = store.remove(&tag1, &both).unwrap();
    assert_eq!(removed, vec![(da.clone(), 1000), (db.clone(), 2000)]);
    assert!(changes.has_changed().unwrap(), "a removal is a change");
    assert_eq!(store.list_tags("r.example", "team/app"), ["2"]);
    assert_eq!(store.usage().blobs, 0);
    assert_eq!(store.usage().evictions, 0, "a purge is not an eviction");
    assert!(!blob_path(dir.path(), &da).exists());
    let evs: Vec<_> = std::iter::from_fn(|| events.try_recv().ok()).collect();
    assert!(evs.contains(&StoreEvent::Removed(da.clone())), "{evs:?}");
    assert!(evs.contains(&StoreEvent::Removed(db.clone())), "{evs:?}");
    // The tag stays removed across a restart; the other one stays.
    drop(store);
    let store = open(dir.path()).await;
    assert_eq!(store.list_tags("r.example", "team/app"), ["2"]);
}

async fn open_memory(root: &Path, memory: u64) -> Store {
    Store::open(
        root,
        StoreOptions {
            memory: Some(memory),
            ..Default::default()
        },
    )
    .await
    .unwrap()
}

/// One memory budget for every write in flight: many writes at once, each followed by a
/// slow reader, never hold more than the budget in their windows (the store's own
/// accounting, exact), writers wait for room instead, and every follower still gets every
/// byte (from the file when its chunk was no longer in memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_memory_budget_bounds_every_window_and_followers_read_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 8 * kagami_store::CHUNK as u64;
    let store = open_memory(dir.path(), budget).await;
    assert_eq!(store.memory_limit(), Some(budget));
    let mut tasks = Vec::new();
    for i in 0..6u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let bytes = data(3 * 1024 * 1024 + 777, 100 + i);
            let d = sha256(&bytes);
            let mut w = writer(&store, &d, Some(bytes.len() as u64));
            // A slow follower: it falls behind the writer and out of its window.
            let slow = w.follow().stream(0, None);
            let follower = tokio::spawn(async move {
                let mut s = std::pin::pin!(slow);
                let mut got = Vec::new();
                while let Some(c) = s.next().await {
                    got.extend_from_slice(&c.unwrap());
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                got
            });
            for c in bytes.chunks(64 * 1024 + 3) {
                w.write_chunks(vec![Bytes::copy_from_slice(c)])
                    .await
                    .unwrap();
            }
            w.commit().await.unwrap();
            let got = tokio::time::timeout(DEADLINE, follower)
                .await
                .unwrap()
                .unwrap();
            assert!(got == bytes, "follower {i} got different bytes");
        }));
    }
    let mut samples = 0;
    while tasks.iter().any(|t| !t.is_finished()) {
        assert!(store.memory_used() <= budget, "{}", store.memory_used());
        samples += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for t in tasks {
        tokio::time::timeout(DEADLINE, t).await.unwrap().unwrap();
    }
    assert!(samples > 0);
    // Exact, not sampled: the most ever taken at once.
    let peak = store.memory_peak();
    assert!(peak <= budget, "peak {peak} over the budget {budget}");
    // Six writes at once wanted more than that: the budget was full at some point.
    assert!(peak > budget / 2, "peak {peak}");
    assert_eq!(store.memory_used(), 0);
}

/// A writer short of memory waits and resumes once room is given back; a reservation that
/// finds the budget short makes windows give up what is already on disk, and followers
/// then read those bytes from the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_short_of_memory_waits_and_windows_give_up_what_is_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let chunk = kagami_store::CHUNK;
    let store = open_memory(dir.path(), 4 * chunk as u64).await;
    let bytes = data(6 * chunk, 7);
    let d = sha256(&bytes);
    let mut w = writer(&store, &d, Some(bytes.len() as u64));
    // Two chunks written: on disk, and kept in the window for followers.
    w.write_chunks(vec![Bytes::copy_from_slice(&bytes[..2 * chunk])])
        .await
        .unwrap();
    assert_eq!(store.memory_used(), 2 * chunk as u64);
    // Someone needs the whole budget: the window gives up its two chunks at once.
    let all = tokio::time::timeout(DEADLINE, store.reserve_memory(4 * chunk as u64))
        .await
        .expect("the window's chunks on disk were given up");
    assert_eq!(store.memory_used(), 4 * chunk as u64);
    // The budget is full: the next write waits ...
    let mut w = tokio::spawn(async move {
        w.write_chunks(vec![Bytes::copy_from_slice(&bytes[2 * chunk..])])
            .await
            .unwrap();
        (w, bytes)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!w.is_finished(), "a write went past a full budget");
    assert!(store.memory_used() <= 4 * chunk as u64);
    // ... and resumes when room is given back.
    drop(all);
    let (w, bytes) = tokio::time::timeout(DEADLINE, &mut w)
        .await
        .expect("the writer resumed")
        .unwrap();
    // A follower from 0: the first chunks are no longer in memory, the file has them.
    let follower = tokio::spawn(drain(w.follow().stream(0, None)));
    w.commit().await.unwrap();
    let (got, err) = tokio::time::timeout(DEADLINE, follower)
        .await
        .unwrap()
        .unwrap();
    assert!(err.is_none(), "{err:?}");
    assert!(got == bytes);
    assert_eq!(store.memory_used(), 0);
}
