//! An in-memory [`Store`] for the pipeline's unit tests: objects in a map,
//! MD5 ETags as S3 computes them, every request logged, a script that can
//! fail any request, answers that can misreport an object's ETag, probes
//! whose answer can be held back, and LastModified times that can be set.

use crate::keys::ObjectKey;
use crate::remote::error::{classify, Answer, ErrorClass, Request, StorageError};
use crate::remote::object_options::ObjectOptions;
use crate::remote::provider::{Addressing, Kind, Resolved, Secret};
use crate::remote::store::{Head, Listed, PendingUpload, Probe, Reply, Store};
use md5::{Digest, Md5};
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// Which request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Put,
    Initiate,
    Part,
    Complete,
    Abort,
    Head,
    List,
    ListUploads,
    Probe,
}

/// One request as the fake saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Req {
    pub op: Op,
    pub key: String,
}

type Script = Box<dyn FnMut(&Req) -> Option<StorageError> + Send>;

/// An object as the fake holds it.
struct Object {
    body: Vec<u8>,
    etag: String,
    /// The recorded part size of a multipart object.
    part_size: Option<u64>,
    /// LastModified as listed (Unix ms): when it was written, unless set.
    modified_ms: Option<u64>,
}

impl Object {
    fn new(body: Vec<u8>, etag: String, part_size: Option<u64>) -> Object {
        Object {
            body,
            etag,
            part_size,
            modified_ms: Some(crate::statedir::now_ms()),
        }
    }
}

#[derive(Default)]
struct Upload {
    key: String,
    parts: BTreeMap<u32, Vec<u8>>,
}

/// See the module docs.
pub struct FakeStore {
    provider: Resolved,
    objects: Mutex<HashMap<String, Object>>,
    uploads: Mutex<HashMap<String, Upload>>,
    log: Mutex<Vec<Req>>,
    script: Mutex<Script>,
    next_id: Mutex<u64>,
    /// How many more answers of each op carry a wrong ETag.
    misreports: Mutex<HashMap<Op, usize>>,
    /// While true, probes wait for an answer (see [`FakeStore::hold_probes`]).
    probes_held: tokio::sync::watch::Sender<bool>,
    /// How long a PUT takes (see [`FakeStore::slow_puts`]).
    put_latency: Mutex<std::time::Duration>,
    /// PUTs under way now, and the most at once since last asked.
    puts_out: Mutex<(usize, usize)>,
}

/// The ETag a misreporting answer carries.
pub const WRONG_ETAG: &str = "00000000000000000000000000000000";

/// A provider named `fake` with MD5 ETags.
pub fn provider() -> Resolved {
    Resolved {
        name: "fake".into(),
        kind: Kind::Minio,
        bucket: "media".into(),
        endpoint: "http://127.0.0.1:1".into(),
        region: "us-east-1".into(),
        addressing: Addressing::Path,
        access_key_id: "AK".into(),
        secret: Secret::new("SECRET".into()),
        prefix: "pre".into(),
        public_url_base: Some("https://cdn.test".into()),
        storage_class: None,
        server_side_encryption: None,
        cache_control: None,
        ca: None,
        allow_insecure: false,
        etag_is_md5: true,
    }
}

/// An error as the server would send it to an upload.
pub fn http_error(status: u16, code: &str) -> StorageError {
    classify(Answer::new(status, Some(code)), Request::Write, &provider())
}

/// A HEAD refused as a key without s3:GetObject is (403, no body).
pub fn head_refused() -> StorageError {
    classify(Answer::new(403, None), Request::Read, &provider())
}

/// A connection failure.
pub fn refused() -> StorageError {
    StorageError::new(
        ErrorClass::Transient,
        "request to provider `fake` could not connect; will retry",
    )
}

fn md5_hex(b: &[u8]) -> String {
    hex::encode(Md5::digest(b))
}

/// The ETag a server gives `body`, if `md5` (sent as Content-MD5) is its MD5;
/// BadDigest otherwise, as S3 answers.
fn checked_etag(body: &[u8], md5: [u8; 16]) -> Result<String, StorageError> {
    let etag = md5_hex(body);
    if etag != hex::encode(md5) {
        return Err(http_error(400, "BadDigest"));
    }
    Ok(etag)
}

impl FakeStore {
    pub fn new() -> FakeStore {
        FakeStore::named("fake")
    }

    /// A store of [`provider`] under another name.
    pub fn named(name: &str) -> FakeStore {
        FakeStore {
            provider: Resolved {
                name: name.into(),
                ..provider()
            },
            objects: Mutex::new(HashMap::new()),
            uploads: Mutex::new(HashMap::new()),
            log: Mutex::new(Vec::new()),
            script: Mutex::new(Box::new(|_| None)),
            next_id: Mutex::new(0),
            misreports: Mutex::new(HashMap::new()),
            probes_held: tokio::sync::watch::Sender::new(false),
            put_latency: Mutex::new(std::time::Duration::ZERO),
            puts_out: Mutex::new((0, 0)),
        }
    }

    /// Every PUT takes `latency` (on tokio's clock) before it is answered,
    /// as over a network: PUTs overlap, and how many do is measured.
    pub fn slow_puts(&self, latency: std::time::Duration) {
        *self.put_latency.lock().unwrap() = latency;
    }

    /// The most PUTs under way at once since the last call.
    pub fn most_puts_at_once(&self) -> usize {
        let mut out = self.puts_out.lock().unwrap();
        let now = out.0;
        std::mem::replace(&mut out.1, now)
    }

    /// The next `n` answers of `op` (PUT, complete or HEAD) report the ETag
    /// [`WRONG_ETAG`] (with the part count of a multipart ETag) while the
    /// object is stored as sent.
    pub fn misreport(&self, op: Op, n: usize) {
        self.misreports.lock().unwrap().insert(op, n);
    }

    /// `etag`, or [`WRONG_ETAG`] while `op`'s answers misreport.
    fn answer(&self, op: Op, etag: &str) -> String {
        let mut m = self.misreports.lock().unwrap();
        match m.get_mut(&op) {
            Some(n) if *n > 0 => {
                *n -= 1;
                match etag.split_once('-') {
                    Some((_, parts)) => format!("{WRONG_ETAG}-{parts}"),
                    None => WRONG_ETAG.to_string(),
                }
            }
            _ => etag.to_string(),
        }
    }

    /// While `held`, a probe waits for its answer (a provider slow to
    /// answer), so its verdict is pending; the script decides it after.
    pub fn hold_probes(&self, held: bool) {
        self.probes_held.send_replace(held);
    }

    /// Replaces the failure script.
    pub fn script(&self, f: impl FnMut(&Req) -> Option<StorageError> + Send + 'static) {
        *self.script.lock().unwrap() = Box::new(f);
    }

    pub fn requests(&self) -> Vec<Req> {
        self.log.lock().unwrap().clone()
    }

    pub fn object(&self, key: &str) -> Option<Vec<u8>> {
        self.objects
            .lock()
            .unwrap()
            .get(key)
            .map(|o| o.body.clone())
    }

    /// The LastModified the object `key` is listed with (`None`: none, as a
    /// server that leaves it out or sends one that does not parse).
    pub fn set_modified(&self, key: &str, modified_ms: Option<u64>) {
        if let Some(o) = self.objects.lock().unwrap().get_mut(key) {
            o.modified_ms = modified_ms;
        }
    }

    fn enter(&self, op: Op, key: &str) -> Result<(), StorageError> {
        let req = Req {
            op,
            key: key.to_string(),
        };
        self.log.lock().unwrap().push(req.clone());
        match (self.script.lock().unwrap())(&req) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Default for FakeStore {
    fn default() -> Self {
        FakeStore::new()
    }
}

impl Store for FakeStore {
    fn provider(&self) -> &Resolved {
        &self.provider
    }

    fn put<'a>(
        &'a self,
        key: &'a ObjectKey,
        body: bytes::Bytes,
        md5: [u8; 16],
        _: &'a ObjectOptions,
    ) -> Reply<'a, Option<String>> {
        Box::pin(async move {
            let latency = *self.put_latency.lock().unwrap();
            if !latency.is_zero() {
                {
                    let mut out = self.puts_out.lock().unwrap();
                    out.0 += 1;
                    out.1 = out.1.max(out.0);
                }
                tokio::time::sleep(latency).await;
                self.puts_out.lock().unwrap().0 -= 1;
            }
            self.enter(Op::Put, key.as_str())?;
            let etag = checked_etag(&body, md5)?;
            let answer = self.answer(Op::Put, &etag);
            self.objects
                .lock()
                .unwrap()
                .insert(key.as_str().into(), Object::new(body.to_vec(), etag, None));
            Ok(Some(answer))
        })
    }

    fn initiate<'a>(
        &'a self,
        key: &'a ObjectKey,
        _: &'a ObjectOptions,
        part_size: u64,
    ) -> Reply<'a, String> {
        Box::pin(async move {
            self.enter(Op::Initiate, key.as_str())?;
            let mut n = self.next_id.lock().unwrap();
            *n += 1;
            let id = format!("upload-{n}-{part_size}");
            self.uploads.lock().unwrap().insert(
                id.clone(),
                Upload {
                    key: key.as_str().into(),
                    parts: BTreeMap::new(),
                },
            );
            Ok(id)
        })
    }

    fn put_part<'a>(
        &'a self,
        key: &'a ObjectKey,
        upload_id: &'a str,
        number: u32,
        body: bytes::Bytes,
        md5: [u8; 16],
    ) -> Reply<'a, String> {
        Box::pin(async move {
            self.enter(Op::Part, key.as_str())?;
            let etag = checked_etag(&body, md5)?;
            let mut u = self.uploads.lock().unwrap();
            let up = u
                .get_mut(upload_id)
                .ok_or_else(|| http_error(404, "NoSuchUpload"))?;
            up.parts.insert(number, body.to_vec());
            Ok(etag)
        })
    }

    fn complete<'a>(
        &'a self,
        key: &'a ObjectKey,
        upload_id: &'a str,
        _: Vec<(u32, String)>,
    ) -> Reply<'a, Option<String>> {
        Box::pin(async move {
            self.enter(Op::Complete, key.as_str())?;
            let up = self
                .uploads
                .lock()
                .unwrap()
                .remove(upload_id)
                .ok_or_else(|| http_error(404, "NoSuchUpload"))?;
            let part_size = up.parts.get(&1).map(|p| p.len() as u64);
            let mut all = Vec::new();
            let mut h = Md5::new();
            for p in up.parts.values() {
                h.update(Md5::digest(p));
                all.extend_from_slice(p);
            }
            let etag = format!("{}-{}", hex::encode(h.finalize()), up.parts.len());
            let answer = self.answer(Op::Complete, &etag);
            self.objects
                .lock()
                .unwrap()
                .insert(up.key, Object::new(all, etag, part_size));
            Ok(Some(answer))
        })
    }

    fn abort<'a>(&'a self, key: &'a str, upload_id: &'a str) -> Reply<'a, ()> {
        Box::pin(async move {
            self.enter(Op::Abort, key)?;
            self.uploads.lock().unwrap().remove(upload_id);
            Ok(())
        })
    }

    fn head<'a>(&'a self, key: &'a ObjectKey) -> Reply<'a, Option<Head>> {
        Box::pin(async move {
            self.enter(Op::Head, key.as_str())?;
            Ok(self
                .objects
                .lock()
                .unwrap()
                .get(key.as_str())
                .map(|o| Head {
                    size: Some(o.body.len() as u64),
                    etag: Some(self.answer(Op::Head, &o.etag)),
                    content_type: None,
                    part_size: o.part_size,
                }))
        })
    }

    fn list_page<'a>(
        &'a self,
        prefix: &'a str,
        _: Option<String>,
    ) -> Reply<'a, (Vec<Listed>, Option<String>)> {
        Box::pin(async move {
            self.enter(Op::List, prefix)?;
            let mut v: Vec<Listed> = self
                .objects
                .lock()
                .unwrap()
                .iter()
                .filter(|(k, _)| k.starts_with(prefix))
                .map(|(k, o)| Listed {
                    key: k.clone(),
                    size: o.body.len() as u64,
                    etag: Some(o.etag.clone()),
                    modified_ms: o.modified_ms,
                })
                .collect();
            v.sort_by(|a, b| a.key.cmp(&b.key));
            Ok((v, None))
        })
    }

    fn list_uploads<'a>(&'a self, prefix: &'a str) -> Reply<'a, Option<Vec<PendingUpload>>> {
        Box::pin(async move {
            self.enter(Op::ListUploads, prefix)?;
            Ok(Some(
                self.uploads
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|(_, u)| u.key.starts_with(prefix))
                    .map(|(id, u)| PendingUpload {
                        key: u.key.clone(),
                        upload_id: id.clone(),
                        initiated_ms: Some(0),
                    })
                    .collect(),
            ))
        })
    }

    /// Logged as [`Op::Probe`], and its HEAD (with [`Probe::WriteAndRead`])
    /// as [`Op::Head`] of `.offloadd-health`.
    fn probe(&self, check: Probe) -> Reply<'_, ()> {
        Box::pin(async move {
            let _ = self.probes_held.subscribe().wait_for(|held| !*held).await;
            self.enter(Op::Probe, ".offloadd-health")?;
            if check == Probe::WriteAndRead {
                self.enter(Op::Head, ".offloadd-health")?;
            }
            Ok(())
        })
    }
}
