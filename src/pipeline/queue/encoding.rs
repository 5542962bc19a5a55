//! How values are laid out in the database: one version byte ([`COMPACT`]),
//! then postcard. Values written by older versions are JSON (they start with
//! `{`) and still read.
//!
//! A file has one entry ([`ENTRY`]): its location record and its queue item
//! side by side, either of them absent. Queueing a file that has a record,
//! and finishing it, rewrite that one value; no key comes and goes per upload
//! (see the module docs of `queue` for why).
//!
//! A location record, the one value kept per offloaded file, is stored
//! smaller than it is held: its object key as the prefix in front of the
//! item's path (the sled key) when that is what it is, and an MD5 ETag (with
//! its part count, for a multipart one) as bytes. Both forms are exact: any
//! other key or ETag is stored as it is.

use super::{Local, Record};
use crate::pipeline::finished::FileIdentity;
use serde::{Deserialize, Serialize};

/// The first byte of a value in the compact encoding.
pub(super) const COMPACT: u8 = 1;

pub(super) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![COMPACT];
    postcard::to_io(v, &mut out).expect("state values always serialize");
    out
}

pub(super) fn decode<T: for<'de> Deserialize<'de>>(bytes: &[u8]) -> Option<T> {
    match bytes.split_first() {
        Some((&COMPACT, rest)) => postcard::from_bytes(rest).ok(),
        _ => serde_json::from_slice(bytes).ok(),
    }
}

/// The first byte of a file's entry.
pub(super) const ENTRY: u8 = 2;

/// A file's entry, split into its halves (each still encoded).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Entry<'a> {
    pub record: Option<&'a [u8]>,
    pub item: Option<&'a [u8]>,
}

impl<'a> Entry<'a> {
    /// `[ENTRY][record length, LEB128][record][item]`; an empty half is absent
    /// (no encoded record or item is empty). `None` if it is not an entry.
    pub(super) fn split(bytes: &'a [u8]) -> Option<Entry<'a>> {
        let (&ENTRY, mut rest) = bytes.split_first()? else {
            return None;
        };
        let (mut len, mut shift) = (0usize, 0u32);
        loop {
            let (&b, r) = rest.split_first()?;
            rest = r;
            len |= usize::from(b & 0x7f).checked_shl(shift)?;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
        }
        let (record, item) = (rest.get(..len)?, rest.get(len..)?);
        Some(Entry {
            record: (!record.is_empty()).then_some(record),
            item: (!item.is_empty()).then_some(item),
        })
    }

    /// The stored value, or `None` when both halves are absent (the key goes).
    pub(super) fn join(self) -> Option<Vec<u8>> {
        if self.record.is_none() && self.item.is_none() {
            return None;
        }
        let (record, item) = (self.record.unwrap_or(&[]), self.item.unwrap_or(&[]));
        let mut out = Vec::with_capacity(1 + 3 + record.len() + item.len());
        out.push(ENTRY);
        let mut len = record.len();
        loop {
            let low = (len & 0x7f) as u8;
            len >>= 7;
            if len == 0 {
                out.push(low);
                break;
            }
            out.push(low | 0x80);
        }
        out.extend_from_slice(record);
        out.extend_from_slice(item);
        Some(out)
    }
}

/// The record of the item whose sled key is `item`.
pub(super) fn encode_record(item: &[u8], r: &Record) -> Vec<u8> {
    encode(&StoredRecord {
        provider: r.provider.clone(),
        key: StoredKey::of(item, &r.key),
        size: r.size,
        etag: StoredEtag::of(&r.etag),
        uploaded_ms: r.uploaded_ms,
        identity: r.identity,
        local: r.local.clone(),
    })
}

pub(super) fn decode_record(item: &[u8], bytes: &[u8]) -> Option<Record> {
    if bytes.first() != Some(&COMPACT) {
        return decode(bytes);
    }
    let s: StoredRecord = decode(bytes)?;
    Some(Record {
        provider: s.provider,
        key: s.key.into_key(item)?,
        size: s.size,
        etag: s.etag.into_etag(),
        uploaded_ms: s.uploaded_ms,
        identity: s.identity,
        local: s.local,
    })
}

#[derive(Serialize, Deserialize)]
struct StoredRecord {
    provider: String,
    key: StoredKey,
    size: u64,
    etag: StoredEtag,
    uploaded_ms: u64,
    identity: FileIdentity,
    local: Local,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum StoredKey {
    /// The object key is this prefix followed by the item's path.
    PrefixOfItem(String),
    Full(String),
}

impl StoredKey {
    fn of(item: &[u8], key: &str) -> StoredKey {
        match std::str::from_utf8(item)
            .ok()
            .and_then(|p| key.strip_suffix(p))
        {
            Some(prefix) => StoredKey::PrefixOfItem(prefix.to_string()),
            None => StoredKey::Full(key.to_string()),
        }
    }

    fn into_key(self, item: &[u8]) -> Option<String> {
        match self {
            StoredKey::PrefixOfItem(prefix) => Some(prefix + std::str::from_utf8(item).ok()?),
            StoredKey::Full(key) => Some(key),
        }
    }
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum StoredEtag {
    /// 32 lowercase hex digits.
    Md5([u8; 16]),
    /// 32 lowercase hex digits, `-`, the part count.
    Composite([u8; 16], u32),
    Other(String),
}

impl StoredEtag {
    fn of(etag: &str) -> StoredEtag {
        let (hex, parts) = match etag.split_once('-') {
            Some((hex, n)) => (hex, n.parse::<u32>().ok()),
            None => (etag, None),
        };
        let digest = (hex.len() == 32
            && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| hex::decode(hex).ok()?.try_into().ok())
        .flatten();
        let stored = match (digest, parts, etag.contains('-')) {
            (Some(d), None, false) => StoredEtag::Md5(d),
            (Some(d), Some(n), true) => StoredEtag::Composite(d, n),
            _ => return StoredEtag::Other(etag.to_string()),
        };
        // Exact or not at all (a part count like "04" would not come back).
        if stored.to_etag() == etag {
            stored
        } else {
            StoredEtag::Other(etag.to_string())
        }
    }

    fn to_etag(&self) -> String {
        match self {
            StoredEtag::Md5(d) => hex::encode(d),
            StoredEtag::Composite(d, n) => format!("{}-{n}", hex::encode(d)),
            StoredEtag::Other(s) => s.clone(),
        }
    }

    fn into_etag(self) -> String {
        match self {
            StoredEtag::Other(s) => s,
            other => other.to_etag(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, etag: &str) -> Record {
        Record {
            provider: "r2-media".into(),
            key: key.into(),
            size: 65536,
            etag: etag.into(),
            uploaded_ms: 1_795_691_565_690,
            identity: FileIdentity {
                dev: 65024,
                ino: 10_000_001,
                size: 65536,
                mtime_ns: 1_795_691_565_690_842_672,
                ctime_ns: 1_795_691_565_690_842_673,
            },
            local: Local::Kept {
                reason: "permission denied".into(),
            },
        }
    }

    #[test]
    fn records_round_trip_exactly_in_every_form() {
        let md5 = "d41d8cd98f00b204e9800998ecf8427e";
        let item = "images/a b/é.png";
        for key in [
            format!("magicads/{item}"),
            item.to_string(),
            "elsewhere/x.png".to_string(),
            String::new(),
        ] {
            for etag in [
                md5.to_string(),
                format!("{md5}-12"),
                format!("{md5}-04"),
                format!("{md5}-"),
                format!("{md5}-1-2"),
                md5.to_uppercase(),
                format!("\"{md5}\""),
                "d41d8cd98f00b204".to_string(),
                "opaque+etag/from=kms".to_string(),
                String::new(),
            ] {
                let r = record(&key, &etag);
                let bytes = encode_record(item.as_bytes(), &r);
                assert_eq!(
                    decode_record(item.as_bytes(), &bytes),
                    Some(r),
                    "{key} {etag}"
                );
            }
        }
    }

    #[test]
    fn the_usual_record_is_stored_small() {
        let item = "images/2026/11/26/00000001-result.png";
        let r = record(
            &format!("magicads/{item}"),
            "d41d8cd98f00b204e9800998ecf8427e",
        );
        let bytes = encode_record(item.as_bytes(), &r);
        let json = serde_json::to_vec(&r).unwrap();
        assert!(bytes.len() < 100, "{} bytes", bytes.len());
        assert!(
            bytes.len() * 3 < json.len(),
            "{} vs {}",
            bytes.len(),
            json.len()
        );
        assert_eq!(
            StoredKey::of(item.as_bytes(), &r.key),
            StoredKey::PrefixOfItem("magicads/".into())
        );
    }

    #[test]
    fn a_record_whose_item_is_not_utf8_keeps_its_key() {
        let item = b"bad\xffname.png";
        let r = record("p/bad%FFname.png", "d41d8cd98f00b204e9800998ecf8427e-3");
        assert_eq!(decode_record(item, &encode_record(item, &r)), Some(r));
    }

    #[test]
    fn entries_round_trip_with_either_half_absent() {
        let long = vec![COMPACT; 300];
        for record in [None, Some(&[COMPACT, 7][..]), Some(&long[..])] {
            for item in [None, Some(&[COMPACT, 1, 2][..]), Some(&b"{}"[..])] {
                let e = Entry { record, item };
                match e.join() {
                    None => assert_eq!((record, item), (None, None)),
                    Some(bytes) => assert_eq!(Entry::split(&bytes), Some(e)),
                }
            }
        }
        assert_eq!(Entry::split(&[COMPACT, 1]), None, "not an entry");
        assert_eq!(Entry::split(&[ENTRY, 5, COMPACT]), None, "cut short");
    }

    #[test]
    fn json_written_by_older_versions_still_reads() {
        let r = record("magicads/a.png", "d41d8cd98f00b204e9800998ecf8427e");
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(decode_record(b"a.png", &json), Some(r));
        assert_eq!(decode_record(b"a.png", &[COMPACT, 0xff]), None);
    }
}
