//! Property tests (proptest) of the names of a file and of config parsing.
//!
//! - path → key → URL over arbitrary names (spaces, `%`, `+`, `?`, `#`,
//!   controls, combining marks, emoji): the relative path is kept byte for
//!   byte, the key is `{trimmed prefix}/{rel}` and fails exactly over 1,024
//!   bytes, every URL segment is unreserved characters or `%XX` and decodes
//!   back to the key's segment;
//! - bad relative paths (leading `/`, empty, `.` or `..` component, NUL) get
//!   the matching [`KeyError`], and no string makes `RelPath::parse` panic;
//! - names that are not UTF-8 give `KeyError::NotUtf8` and print lossily;
//! - config: sizes and durations in every unit parse to the exact value,
//!   overflow is an error naming the key, an unknown key anywhere is an error
//!   naming that key at its line and column, and garbage never panics.
//!
//! 256 cases per property, 4096 with `OFFLOADD_TORTURE=full`. Failures are
//! not persisted to files: proptest prints the minimal input.

use offloadd::config::{load, ConfigError, Loaded, RootCheck};
use offloadd::keys::{ItemKey, KeyError, ObjectKey, PublicUrl, RelPath, MAX_KEY_LEN};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: crate::scale(256, 4096) as u32,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Strategies for names.

/// Characters that stress encoding: reserved and unsafe ASCII, controls,
/// a combining mark (NFD), zero-width and replacement characters, emoji.
const TRICKY: &[char] = &[
    ' ', '%', '+', '?', '#', '&', '=', ':', '@', '!', '$', '\'', '(', ')', '*', ',', ';', '[', ']',
    '"', '<', '>', '\\', '^', '`', '{', '|', '}', '~', '-', '_', '.', '\t', '\n', '\r', '\u{1}',
    '\u{7f}', '\u{80}', 'é', 'e', '\u{301}', 'ß', 'Å', '日', '😀', '👩', '\u{200d}', '\u{200b}',
    '\u{feff}', '\u{fffd}', 'A', 'z', '0', '9',
];

/// One path component: non-empty, no `/`, no NUL, not `.` or `..`.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::collection::vec(prop::sample::select(TRICKY), 1..12)
            .prop_map(|c| c.into_iter().collect::<String>()),
        4 => r"[^/\x00]{1,12}",
        1 => r"[^/\x00]{1,120}",
        1 => Just("...".to_owned()),
        1 => Just(".hidden".to_owned()),
    ]
    .prop_filter("not . or ..", |s| s != "." && s != "..")
}

/// 1..6 components.
fn segments() -> impl Strategy<Value = Vec<String>> {
    prop::collection::vec(segment(), 1..=6)
}

/// A prefix as written: leading slashes, the trimmed part, trailing slashes.
fn prefix() -> impl Strategy<Value = (String, String)> {
    let core = prop_oneof![
        1 => Just(String::new()),
        3 => prop::collection::vec(segment(), 1..=3).prop_map(|s| s.join("/")),
        1 => (1usize..1100).prop_map(|n| "p".repeat(n)),
    ];
    (0usize..4, core, 0usize..4).prop_map(|(lead, core, trail)| {
        (
            format!("{}{core}{}", "/".repeat(lead), "/".repeat(trail)),
            core,
        )
    })
}

/// A public URL base, with or without a path and trailing slashes.
fn base_url() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "https://cdn.example",
            "https://cdn.example/",
            "https://pub-0123.r2.dev//",
            "http://127.0.0.1:9000/bucket",
            "https://h.example/a%20b/",
        ])
        .prop_map(String::from),
        r"https://[a-z0-9]{1,10}\.example(:[0-9]{1,5})?(/[a-zA-Z0-9._~-]{1,6}){0,2}/{0,3}",
    ]
}

/// An absolute watch root.
fn root() -> impl Strategy<Value = PathBuf> {
    prop::collection::vec(segment(), 0..3).prop_map(|s| PathBuf::from(format!("/{}", s.join("/"))))
}

// ---------------------------------------------------------------------------
// Checks.

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b)
}

/// Decodes one URL segment that must hold only unreserved characters and
/// `%XX` (upper-case hex) of characters that needed encoding.
fn decode_segment(seg: &str) -> Result<Vec<u8>, String> {
    let bytes = seg.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if is_unreserved(b) {
            out.push(b);
            i += 1;
            continue;
        }
        if b != b'%' {
            return Err(format!(
                "`{seg}` holds {:?}, neither unreserved nor %XX",
                b as char
            ));
        }
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|h| {
                h.iter()
                    .all(|c| c.is_ascii_digit() || (b'A'..=b'F').contains(c))
            })
            .ok_or_else(|| {
                format!("`{seg}`: `%` at {i} is not followed by two upper-case hex digits")
            })?;
        let v = u8::from_str_radix(std::str::from_utf8(hex).unwrap(), 16).unwrap();
        if is_unreserved(v) {
            return Err(format!("`{seg}` encodes the unreserved {:?}", v as char));
        }
        out.push(v);
        i += 3;
    }
    Ok(out)
}

/// `url` is `{base without trailing /}/{enc(seg)}/…` for every segment of `key`.
fn check_url(url: &str, base: &str, key: &str) -> Result<(), TestCaseError> {
    let start = base.trim_end_matches('/');
    let rest = url.strip_prefix(start).and_then(|r| r.strip_prefix('/'));
    prop_assert!(rest.is_some(), "{url:?} does not start with {start:?}/");
    let encoded: Vec<&str> = rest.unwrap().split('/').collect();
    let raw: Vec<&str> = key.split('/').collect();
    prop_assert_eq!(
        encoded.len(),
        raw.len(),
        "segments of {:?} vs key {:?}",
        url,
        key
    );
    for (e, r) in encoded.iter().zip(&raw) {
        let decoded = decode_segment(e).map_err(TestCaseError::fail)?;
        prop_assert_eq!(
            decoded.as_slice(),
            r.as_bytes(),
            "segment {:?} of {:?}",
            e,
            url
        );
    }
    Ok(())
}

/// The key `ObjectKey::new` must give, or its error.
fn expected_key(trimmed_prefix: &str, rel: &str) -> Result<String, KeyError> {
    let key = if trimmed_prefix.is_empty() {
        rel.to_owned()
    } else {
        format!("{trimmed_prefix}/{rel}")
    };
    if key.len() > 1024 {
        return Err(KeyError::TooLong { len: key.len() });
    }
    Ok(key)
}

fn parsed(s: &str) -> Result<String, KeyError> {
    RelPath::parse(s).map(String::from)
}

/// What an ItemKey's `rel` and the other names must be for a valid `rel_s`.
fn check_item_key(root: &Path, rel: &RelPath, rel_s: &str) -> Result<(), TestCaseError> {
    let item = ItemKey::from_rel(rel);
    prop_assert_eq!(item.as_bytes(), rel_s.as_bytes());
    prop_assert_eq!(item.rel(root), Ok(rel.clone()));
    prop_assert_eq!(item.to_local(root), root.join(rel_s));
    prop_assert_eq!(rel.to_local(root), root.join(rel_s));
    prop_assert_eq!(ItemKey::of(root, &root.join(rel_s)), Some(item.clone()));
    prop_assert_eq!(RelPath::from_fs(root, &root.join(rel_s)), Ok(rel.clone()));
    prop_assert_eq!(item.to_string(), rel_s);
    let json = serde_json::to_string(rel).unwrap();
    prop_assert_eq!(
        serde_json::from_str::<RelPath>(&json).ok(),
        Some(rel.clone())
    );
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    /// Property 1: any valid relative path → key → URL, byte for byte.
    #[test]
    fn path_key_url(
        segs in segments(),
        (prefix, trimmed) in prefix(),
        base in base_url(),
        root in root(),
    ) {
        prop_assert_eq!(MAX_KEY_LEN, 1024);
        let rel_s = segs.join("/");
        prop_assert_eq!(parsed(&rel_s), Ok(rel_s.clone()));
        let rel = RelPath::parse(&rel_s).unwrap();
        prop_assert_eq!(rel.as_str().as_bytes(), rel_s.as_bytes());
        prop_assert_eq!(rel.to_string(), rel_s.clone());

        let want = expected_key(&trimmed, &rel_s);
        let got = ObjectKey::new(&prefix, &rel);
        prop_assert_eq!(got.as_ref().map(|k| k.as_str().to_owned()).map_err(Clone::clone), want);
        if let Ok(key) = &got {
            prop_assert_eq!(key.to_string(), key.as_str());
            let url = PublicUrl::new(&base, key);
            prop_assert_eq!(url.to_string(), url.as_str());
            check_url(url.as_str(), &base, key.as_str())?;
        }
        check_item_key(&root, &rel, &rel_s)?;
    }

    /// Property 1b: the 1,024-byte limit, exactly at the boundary, with the
    /// length in the prefix or in the path.
    #[test]
    fn key_length_boundary(
        segs in prop::collection::vec(r"[^/\x00]{1,8}", 1..=4)
            .prop_filter("not . or ..", |s| s.iter().all(|c| c != "." && c != "..")),
        delta in -3i64..=3,
        in_prefix in any::<bool>(),
        slashes in 0usize..3,
    ) {
        let rel_s = segs.join("/");
        let target = (MAX_KEY_LEN as i64 + delta) as usize;
        // `target` = padding + 1 (the `/`) + rel_s.
        let pad = "a".repeat(target - rel_s.len() - 1);
        let s = "/".repeat(slashes);
        let (prefix, rel_s) = if in_prefix {
            (format!("{s}{pad}{s}"), rel_s)
        } else {
            (s, format!("{rel_s}/{pad}"))
        };
        let rel = RelPath::parse(&rel_s).unwrap();
        let got = ObjectKey::new(&prefix, &rel);
        if delta > 0 {
            prop_assert_eq!(got, Err(KeyError::TooLong { len: target }));
        } else {
            prop_assert!(got.is_ok(), "{got:?}");
            prop_assert_eq!(got.unwrap().as_str().len(), target);
        }
    }

    /// Property 2a: a leading `/` (after any `./`) is `Absolute`, whatever follows.
    #[test]
    fn leading_slash_is_absolute(
        dots in 0usize..3,
        slashes in 1usize..4,
        rest in prop_oneof![segments().prop_map(|s| s.join("/")), ".*"],
    ) {
        let s = format!("{}{}{rest}", "./".repeat(dots), "/".repeat(slashes));
        prop_assert_eq!(parsed(&s), Err(KeyError::Absolute { path: s.clone() }));
    }

    /// Property 2b: an empty, `.`, `..` or NUL-bearing component after the
    /// first (or `..` anywhere) is `BadComponent`; leading `./` is stripped.
    #[test]
    fn bad_component(
        segs in segments(),
        at in any::<prop::sample::Index>(),
        bad in prop::sample::select(vec!["", ".", "..", "\0", "a\0", "\0b"]),
        dots in 0usize..3,
    ) {
        let mut parts = segs.clone();
        // `.` or an empty component first would be a stripped `./` or a leading `/`.
        let first = if bad == ".." || bad.contains('\0') { 0 } else { 1 };
        let i = first + at.index(parts.len() + 1 - first);
        parts.insert(i, bad.to_owned());
        let s = format!("{}{}", "./".repeat(dots), parts.join("/"));
        prop_assert_eq!(parsed(&s), Err(KeyError::BadComponent { path: s.clone() }));
        prop_assert!(serde_json::from_value::<RelPath>(serde_json::Value::String(s)).is_err());
        // Leading `./` alone is accepted and dropped; nothing but `./` is Empty.
        let good = segs.join("/");
        prop_assert_eq!(parsed(&format!("{}{good}", "./".repeat(dots))), Ok(good));
        prop_assert_eq!(parsed(&"./".repeat(dots)), Err(KeyError::Empty));
    }

    /// Property 2c: no string makes parse panic, and its answer follows the rules.
    #[test]
    fn parse_never_panics(
        s in prop_oneof![
            ".*",
            prop::collection::vec(
                prop::sample::select(vec!['/', '.', '.', '/', 'a', '\0', ' ', 'é', '😀', '%']),
                0..16,
            )
            .prop_map(|c| c.into_iter().collect::<String>()),
        ],
        root in root(),
    ) {
        let mut rest = s.as_str();
        while let Some(r) = rest.strip_prefix("./") {
            rest = r;
        }
        let bad = |c: &str| c.is_empty() || c == "." || c == ".." || c.contains('\0');
        let want = if rest.is_empty() {
            Err(KeyError::Empty)
        } else if rest.starts_with('/') {
            Err(KeyError::Absolute { path: s.clone() })
        } else if rest.split('/').any(bad) {
            Err(KeyError::BadComponent { path: s.clone() })
        } else {
            Ok(rest.to_owned())
        };
        prop_assert_eq!(parsed(&s), want.clone());
        let via_serde = serde_json::from_value::<RelPath>(serde_json::Value::String(s.clone()));
        prop_assert_eq!(via_serde.map(String::from).ok(), want.clone().ok());
        if let Ok(rel) = RelPath::parse(&s) {
            let key = ObjectKey::new("p", &rel);
            prop_assert_eq!(key.as_ref().map(|k| k.as_str().to_owned()).map_err(Clone::clone), expected_key("p", rel.as_str()));
            if let Ok(key) = key {
                check_url(PublicUrl::new("https://h/", &key).as_str(), "https://h/", key.as_str())?;
            }
            check_item_key(&root, &rel, rel.as_str())?;
        }
    }

    /// Property 3: a name that is not UTF-8 is `NotUtf8` with the lossy name,
    /// and prints lossily.
    #[test]
    fn not_utf8_names(
        segs in segments(),
        inserts in prop::collection::vec(
            (any::<prop::sample::Index>(), any::<prop::sample::Index>(), prop::sample::select(INVALID)),
            1..4,
        ),
        root in root(),
    ) {
        // Each sequence goes at a character boundary of the valid text, and
        // two at the same boundary are kept apart by `|`, so that no inserted
        // byte completes a character.
        let mut at_boundary: Vec<Vec<Vec<&[u8]>>> = segs
            .iter()
            .map(|s| vec![Vec::new(); s.chars().count() + 1])
            .collect();
        for (seg, at, invalid) in &inserts {
            let slots = &mut at_boundary[seg.index(segs.len())];
            let n = at.index(slots.len());
            slots[n].push(invalid);
        }
        let parts: Vec<Vec<u8>> = segs
            .iter()
            .zip(&at_boundary)
            .map(|(s, slots)| {
                let mut out = Vec::new();
                let mut chars = s.chars();
                for slot in slots {
                    out.extend(slot.join(&b'|'));
                    if let Some(c) = chars.next() {
                        out.extend(c.to_string().as_bytes());
                    }
                }
                out
            })
            .collect();
        let bytes = parts.join(&b'/');
        prop_assert!(std::str::from_utf8(&bytes).is_err());
        let lossy = String::from_utf8_lossy(&bytes).into_owned();

        let key = ItemKey::from_bytes(bytes.clone());
        prop_assert!(key.is_some());
        let key = key.unwrap();
        prop_assert_eq!(key.as_bytes(), bytes.as_slice());
        prop_assert_eq!(key.to_string(), lossy.clone());
        prop_assert_eq!(format!("{key:?}"), format!("ItemKey({lossy})"));
        let local = root.join(OsStr::from_bytes(&bytes));
        prop_assert_eq!(key.to_local(&root), local.clone());
        prop_assert_eq!(ItemKey::of(&root, &local), Some(key.clone()));
        let err = key.rel(&root);
        prop_assert_eq!(err.clone(), Err(KeyError::NotUtf8 { lossy: lossy.clone() }));
        let text = err.unwrap_err().to_string();
        prop_assert!(text.contains(&lossy) && text.contains("rename the file"), "{}", text);
    }

    /// Property 3b: arbitrary bytes (NUL included: the control socket takes
    /// raw bytes) never panic; the answer is consistent with `parse`.
    #[test]
    fn arbitrary_item_keys(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..40),
            prop::collection::vec(prop::sample::select(vec![b'/', b'.', b'a', 0xff, 0xc3, 0xa9, 0x80]), 0..16),
        ],
        root in root(),
    ) {
        let key = ItemKey::from_bytes(bytes.clone());
        prop_assert_eq!(key.is_none(), bytes.is_empty() || bytes[0] == b'/');
        let Some(key) = key else { return Ok(()) };
        prop_assert_eq!(key.to_string(), String::from_utf8_lossy(&bytes).into_owned());
        match key.rel(&root) {
            Ok(rel) => {
                prop_assert!(std::str::from_utf8(&bytes).is_ok());
                prop_assert_eq!(parsed(rel.as_str()), Ok(rel.as_str().to_owned()));
            }
            Err(KeyError::NotUtf8 { lossy }) => {
                // (Path drops a trailing `/` or a `.` component from the name.)
                prop_assert!(std::str::from_utf8(&bytes).is_err());
                prop_assert!(lossy.contains('\u{fffd}'), "{:?}", lossy);
            }
            Err(KeyError::BadComponent { .. }) => {
                prop_assert!(bytes.contains(&0), "only NUL is a bad component here");
            }
            Err(KeyError::Empty | KeyError::OutsideRoot { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected {e:?}"),
        }
    }
}

/// Byte sequences that are never valid UTF-8 at a character boundary:
/// bad leads, lone continuations, overlongs, surrogates, over U+10FFFF,
/// truncated sequences.
const INVALID: &[&[u8]] = &[
    b"\xff",
    b"\xfe",
    b"\x80",
    b"\xbf",
    b"\xc0\x80",
    b"\xc1\xbf",
    b"\xe0\x80\x80",
    b"\xed\xa0\x80",
    b"\xed\xbf\xbf",
    b"\xf4\x90\x80\x80",
    b"\xf5\x80\x80\x80",
    b"\xf8\x88\x80\x80\x80",
    b"\xe2\x82",
    b"\xf0\x9f\x98",
    b"\xc3",
];

// ---------------------------------------------------------------------------
// Config.

/// A temp dir with `results/` (the watch root) and the config file.
struct Fx {
    dir: tempfile::TempDir,
}

impl Fx {
    fn new() -> Fx {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("results")).unwrap();
        Fx { dir }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("config.yaml")
    }

    fn load(&self, text: &str) -> Result<Loaded, ConfigError> {
        let path = self.path();
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        load(&path, RootCheck::MustExist)
    }

    /// The minimal valid config: the root, state_dir, socket and no listener.
    fn minimal(&self) -> String {
        let d = self.dir.path().display();
        format!("watch:\n  root: {d}/results\nstate_dir: {d}/state\ncontrol_socket: {d}/ctl.sock\nhttp:\n  listen: \"\"\n")
    }

    /// A config with every section written in block style.
    fn full(&self) -> String {
        let d = self.dir.path().display();
        format!(
            "# offloadd props\n\
watch:\n  root: {d}/results\n  include: [\"**\"]\n  settle: 2s\n\
state_dir: {d}/state\n\
control_socket: {d}/ctl.sock\n\
storage:\n  active: p1\n  delete_after: 0s\n  providers:\n    p1:\n      kind: minio\n      endpoint: http://127.0.0.1:9000\n      bucket: media\n      access_key_id: AKPROPS\n      public_url: https://cdn.example/m\n      prefix: magicads\n\
upload:\n  workers: 4\n  part_size: 8MiB\n  retry:\n    initial_backoff: 1s\n    max_backoff: 5m\n\
http:\n  listen: \"\"\n  allow_remote: false\n\
log:\n  format: text\n  level: info\n"
        )
    }
}

/// Size units and their factors, as `units.rs` documents them.
const SIZE_UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("B", 1),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
    ("KB", 1_000),
    ("MB", 1_000_000),
    ("GB", 1_000_000_000),
    ("TB", 1_000_000_000_000),
];

/// Duration units in milliseconds; a bare number is seconds.
const DURATION_UNITS: &[(&str, u64)] = &[
    ("ms", 1),
    ("s", 1_000),
    ("m", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
    ("", 1_000),
];

/// A number in `lo..=hi`, often at an edge.
fn number(lo: u64, hi: u64) -> BoxedStrategy<u64> {
    prop_oneof![
        Just(lo),
        Just(hi),
        lo..=hi,
        lo..=hi.min(lo.saturating_add(1000))
    ]
    .boxed()
}

/// How a value is written: `{n}{unit}`, `{n} {unit}`, quoted or not.
fn write(n: u64, unit: &str, space: bool, quoted: bool) -> String {
    let sp = if space && !unit.is_empty() { " " } else { "" };
    let text = format!("{n}{sp}{unit}");
    if quoted {
        format!("\"{text}\"")
    } else {
        text
    }
}

/// A size written in some unit with its value in bytes, `lo..=hi`.
fn size(lo: u64, hi: u64) -> impl Strategy<Value = (String, u64)> {
    let units: Vec<(&str, u64)> = SIZE_UNITS
        .iter()
        .copied()
        .filter(|(_, f)| lo.div_ceil(*f) <= hi / f)
        .collect();
    (prop::sample::select(units), any::<bool>(), any::<bool>()).prop_flat_map(
        move |((unit, f), space, quoted)| {
            number(lo.div_ceil(f), hi / f).prop_map(move |n| (write(n, unit, space, quoted), n * f))
        },
    )
}

/// A duration written in some unit with its value.
/// The longest duration a config takes: ten years, in ms.
const MAX_DURATION_MS: u64 = 3650 * 86_400_000;

fn duration() -> impl Strategy<Value = (String, Duration)> {
    (
        prop::sample::select(DURATION_UNITS),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_flat_map(|((unit, per), space, quoted)| {
            if unit.is_empty() && !quoted {
                // A YAML integer: seconds.
                return number(0, MAX_DURATION_MS / 1000)
                    .prop_map(|n| (n.to_string(), Duration::from_secs(n)))
                    .boxed();
            }
            number(0, MAX_DURATION_MS / per)
                .prop_map(move |n| {
                    (
                        write(n, unit, space, quoted),
                        Duration::from_millis(n * per),
                    )
                })
                .boxed()
        })
}

/// A duration over ten years, up to what a u64 holds and past it.
fn too_long_duration() -> impl Strategy<Value = String> {
    (
        prop::sample::select(DURATION_UNITS),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_flat_map(|((unit, per), space, quoted)| {
            number(MAX_DURATION_MS / per + 1, u64::MAX)
                .prop_map(move |n| write(n, unit, space, quoted))
                .boxed()
        })
}

/// The line (1-based) in `text` whose trimmed start begins with `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(needle))
        .expect("needle")
        + 1
}

/// Sections of [`Fx::full`]: dotted path, header line (`None` for the top
/// level), child indent, valid keys.
fn sections() -> Vec<(&'static str, Option<&'static str>, usize, Vec<&'static str>)> {
    vec![
        (
            "",
            None,
            0,
            vec![
                "watch",
                "state_dir",
                "control_socket",
                "storage",
                "upload",
                "http",
                "log",
            ],
        ),
        (
            "watch",
            Some("watch:"),
            2,
            vec!["root", "include", "exclude", "settle", "rescan_interval"],
        ),
        (
            "storage",
            Some("storage:"),
            2,
            vec!["active", "delete_local", "delete_after", "providers"],
        ),
        (
            "storage.providers.p1",
            Some("    p1:"),
            6,
            offloadd::remote::provider::SECTION_KEYS.to_vec(),
        ),
        (
            "upload",
            Some("upload:"),
            2,
            vec![
                "workers",
                "multipart_threshold",
                "part_size",
                "part_concurrency",
                "memory_limit",
                "bandwidth_limit",
                "retry",
            ],
        ),
        (
            "upload.retry",
            Some("  retry:"),
            4,
            vec!["initial_backoff", "max_backoff"],
        ),
        ("http", Some("http:"), 2, vec!["listen", "allow_remote"]),
        ("log", Some("log:"), 2, vec!["format", "level"]),
    ]
}

/// Line indices where a key at `indent` may go in the block after `header`.
fn slots(lines: &[&str], header: Option<&str>, indent: usize) -> Vec<usize> {
    let start = match header {
        None => 0,
        Some(h) => lines.iter().position(|l| l.starts_with(h)).expect("header") + 1,
    };
    let ind = |l: &str| l.len() - l.trim_start_matches(' ').len();
    let is_child = |l: &&str| !l.trim().is_empty() && !l.trim_start().starts_with('#');
    let end = (start..lines.len())
        .find(|&i| is_child(&lines[i]) && ind(lines[i]) < indent)
        .unwrap_or(lines.len());
    (start..=end)
        .filter(|&i| i == end || (is_child(&lines[i]) && ind(lines[i]) == indent))
        .collect()
}

/// An unknown key as written and as serde names it.
fn unknown_key() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        4 => r"[a-z][a-z0-9_-]{0,20}".prop_map(|k| (k.clone(), k)),
        1 => r"[A-Za-z_][A-Za-z0-9_.]{0,12}".prop_map(|k| (k.clone(), k)),
        1 => prop::sample::select(vec!["clé", "ключ", "日本", "größe", "emoji😀"])
            .prop_map(|k| (k.to_owned(), k.to_owned())),
        1 => r"[a-z][a-z0-9 .:/-]{0,12}[a-z]".prop_map(|k| (format!("\"{k}\""), k)),
    ]
}

/// Characters that mean something to YAML, and some that do not.
const YAML_CHARS: &[char] = &[
    ':', ' ', ' ', '\n', '\n', '-', '[', ']', '{', '}', ',', '"', '\'', '#', '&', '*', '!', '|',
    '>', '%', '@', '`', '\t', '?', '\\', 'a', '0', '5', 'M', 'i', 'B', 's', 'é', '😀', '\r',
    '\u{feff}', '~', '.', '/',
];

proptest! {
    #![proptest_config(config())]

    /// Property 4a: sizes in every unit parse to the exact byte count.
    #[test]
    fn sizes_parse_exactly(
        (bandwidth, bw) in size(0, u64::MAX),
        (part, p) in size(5 << 20, 5 << 30),
        (threshold, t) in size(0, 5 << 30),
    ) {
        let fx = Fx::new();
        let text = format!(
            "{}upload:\n  bandwidth_limit: {bandwidth}\n  part_size: {part}\n  memory_limit: {}\n  multipart_threshold: {threshold}\n",
            fx.minimal(),
            2 * p
        );
        let loaded = fx.load(&text);
        prop_assert!(loaded.is_ok(), "{}\n{:?}", text, loaded.err().map(|e| e.to_string()));
        let u = loaded.unwrap().config.upload;
        prop_assert_eq!(
            (u.bandwidth_limit, u.part_size, u.memory_limit, u.multipart_threshold),
            (bw, p, 2 * p, t),
            "{}", text
        );
    }

    /// Property 4b: a size over u64 is an error naming the key and line, never a wrap.
    #[test]
    fn size_overflow_is_an_error(
        (unit, f) in prop::sample::select(&SIZE_UNITS[2..]),
        extra in number(1, u64::MAX),
        space in any::<bool>(),
        quoted in any::<bool>(),
    ) {
        let fx = Fx::new();
        let n = (u64::MAX / f).saturating_add(extra);
        let text = format!("{}upload:\n  bandwidth_limit: {}\n", fx.minimal(), write(n, unit, space, quoted));
        match fx.load(&text) {
            Err(ConfigError::Invalid { position, key, message, .. }) => {
                prop_assert_eq!(key, "upload.bandwidth_limit");
                prop_assert_eq!(position.map(|p| p.0), Some(line_of(&text, "bandwidth_limit")));
                prop_assert!(message.contains("is not a size"), "{}", message);
            }
            other => prop_assert!(false, "{text}\n{other:?}"),
        }
    }

    /// Property 4c: durations in every unit parse to the exact value; 0 turns
    /// rescan off; max_backoff below initial_backoff is an error at its line.
    #[test]
    fn durations_parse_exactly(
        (settle, s) in duration(),
        (delete_after, da) in duration(),
        (rescan, r) in duration(),
        (initial, i) in duration().prop_filter("non-zero", |(_, d)| !d.is_zero()),
        (max, m) in duration(),
    ) {
        let fx = Fx::new();
        let d = fx.dir.path().display();
        let text = format!(
            "state_dir: {d}/state\ncontrol_socket: {d}/ctl.sock\nhttp:\n  listen: \"\"\nwatch:\n  root: {d}/results\n  settle: {settle}\n  rescan_interval: {rescan}\nstorage:\n  delete_after: {delete_after}\nupload:\n  retry:\n    initial_backoff: {initial}\n    max_backoff: {max}\n"
        );
        let loaded = fx.load(&text);
        if m < i {
            match loaded {
                Err(ConfigError::Invalid { position, key, .. }) => {
                    prop_assert_eq!(key, "upload.retry.max_backoff");
                    prop_assert_eq!(position, Some((line_of(&text, "max_backoff"), 5)));
                }
                other => prop_assert!(false, "{text}\n{other:?}"),
            }
            return Ok(());
        }
        prop_assert!(loaded.is_ok(), "{}\n{:?}", text, loaded.err().map(|e| e.to_string()));
        let c = loaded.unwrap().config;
        prop_assert_eq!(c.watch.settle, s, "{}", text);
        prop_assert_eq!(c.watch.rescan_interval, Some(r).filter(|r| !r.is_zero()), "{}", text);
        prop_assert_eq!(c.storage.delete_after, da, "{}", text);
        prop_assert_eq!((c.upload.retry.initial_backoff, c.upload.retry.max_backoff), (i, m), "{}", text);
    }

    /// Property 4c': a duration over ten years (which, added to now, used to
    /// panic at start-up) is an error naming the key and line.
    #[test]
    fn durations_over_ten_years_are_errors(written in too_long_duration()) {
        let fx = Fx::new();
        let text = format!("{}storage:\n  delete_after: {written}\n", fx.minimal());
        match fx.load(&text) {
            Err(ConfigError::Invalid { position, key, message, .. }) => {
                prop_assert_eq!(key, "storage.delete_after");
                prop_assert_eq!(position.map(|p| p.0), Some(line_of(&text, "delete_after")));
                prop_assert!(message.contains("longer than ten years"), "{}", message);
            }
            other => prop_assert!(false, "{text}\n{other:?}"),
        }
    }

    /// Property 4d: an unknown key in any section is an error naming that
    /// key (dotted) at its line and column.
    #[test]
    fn unknown_key_is_named_at_its_line(
        section in any::<prop::sample::Index>(),
        slot in any::<prop::sample::Index>(),
        (written, name) in unknown_key(),
        value in prop::sample::select(vec!["1", "x", "\"s\"", "[a, b]", "{ a: 1 }", "", "true", "5MiB"]),
    ) {
        let fx = Fx::new();
        let full = fx.full();
        prop_assert!(fx.load(&full).is_ok(), "the base config loads");
        let sections = sections();
        let (path, header, indent, valid) = &sections[section.index(sections.len())];
        prop_assume!(!valid.contains(&name.as_str()));
        let mut lines: Vec<&str> = full.lines().collect();
        let slots = slots(&lines, *header, *indent);
        let at = slots[slot.index(slots.len())];
        let inserted = format!("{}{written}:{}{value}", " ".repeat(*indent), if value.is_empty() { "" } else { " " });
        lines.insert(at, &inserted);
        let text = lines.join("\n") + "\n";
        let want_key = if path.is_empty() { name.clone() } else { format!("{path}.{name}") };
        match fx.load(&text) {
            Err(e @ ConfigError::Invalid { .. }) => {
                let shown = e.to_string();
                let ConfigError::Invalid { position, key, message, .. } = e else { unreachable!() };
                prop_assert_eq!(&key, &want_key, "{}\n{}", text, shown);
                prop_assert_eq!(position, Some((at + 1, indent + 1)), "{}\n{}", text, shown);
                prop_assert!(message.starts_with(&format!("unknown key `{name}` ")), "{}", shown);
                let place = format!(
                    "{}: line {}, column {}: unknown key `{name}`",
                    fx.path().display(),
                    at + 1,
                    indent + 1
                );
                prop_assert!(shown.starts_with(&place), "{}\n{}", text, shown);
            }
            other => prop_assert!(false, "{text}\n{:?}", other.map(|_| ())),
        }
    }

    /// Property 4e: garbage text never panics: arbitrary text, and the full
    /// config mutated by character edits.
    #[test]
    fn garbage_never_panics(
        text in prop_oneof![
            ".*",
            prop::collection::vec(prop::sample::select(YAML_CHARS), 0..200)
                .prop_map(|c| c.into_iter().collect::<String>()),
        ],
        edits in prop::collection::vec(
            (0u8..4, any::<prop::sample::Index>(), prop::sample::select(YAML_CHARS)),
            1..8,
        ),
        value in ".{0,20}",
    ) {
        let fx = Fx::new();
        check_garbage(&fx, &text)?;
        let mut chars: Vec<char> = fx.full().chars().collect();
        for (op, at, c) in &edits {
            let i = at.index(chars.len() + 1);
            match op {
                0 => chars.insert(i, *c),
                1 if i < chars.len() => { chars.remove(i); }
                2 if i < chars.len() => chars[i] = *c,
                _ => {
                    // Replace a value with arbitrary text.
                    let text: String = chars.iter().collect();
                    let lines: Vec<&str> = text.lines().collect();
                    let n = at.index(lines.len());
                    let line = match lines[n].split_once(": ") {
                        Some((k, _)) => format!("{k}: {value}"),
                        None => lines[n].to_owned(),
                    };
                    let mut out = lines.clone();
                    out[n] = &line;
                    chars = (out.join("\n") + "\n").chars().collect();
                }
            }
        }
        check_garbage(&fx, &chars.iter().collect::<String>())?;
    }
}

/// `load` answers; an error with a position names a line and column ≥ 1 and
/// starts with the file name.
fn check_garbage(fx: &Fx, text: &str) -> Result<(), TestCaseError> {
    match fx.load(text) {
        Ok(_) => {}
        Err(e) => {
            let shown = e.to_string();
            prop_assert!(
                shown.starts_with(&fx.path().display().to_string()),
                "{}",
                shown
            );
            if let ConfigError::Invalid {
                position: Some((l, c)),
                ..
            } = e
            {
                prop_assert!(l >= 1 && c >= 1, "{}", shown);
            }
        }
    }
    Ok(())
}
