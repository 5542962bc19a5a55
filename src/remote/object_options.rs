//! Which headers an object is uploaded with: the per-pattern `rules:` of the
//! configuration over the provider's defaults.
//!
//! Rules are matched in order by glob against the file's path relative to the
//! root; the first match wins, and each option it sets replaces the default
//! (the provider's `cache_control` and `storage_class`, the content type
//! guessed from the file name, no `Content-Disposition`).

use crate::keys::RelPath;
use globset::{GlobBuilder, GlobMatcher};
use serde::Deserialize;

/// One entry of `rules:` as written.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSection {
    /// A glob over the path relative to the root, e.g. `videos/**/*.mp4`.
    #[serde(rename = "match")]
    pub pattern: String,
    pub cache_control: Option<String>,
    pub content_type: Option<String>,
    pub storage_class: Option<String>,
    pub content_disposition: Option<String>,
}

/// The options an object gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectOptions {
    pub content_type: String,
    pub cache_control: Option<String>,
    pub storage_class: Option<String>,
    pub content_disposition: Option<String>,
    /// The index of the rule that matched, if one did.
    pub rule: Option<usize>,
}

/// The compiled rules.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<(GlobMatcher, RuleSection)>,
}

/// Why a rule is not usable; the index is 0-based.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`rules[{index}]`: {message}")]
pub struct RuleError {
    pub index: usize,
    pub message: String,
}

/// Whether `value` can go as a header of an upload: visible ASCII on one
/// line. (`HeaderValue` takes other bytes too, but the request signature
/// cannot cover them, so every upload carrying one would fail.)
pub fn header_ok(value: &str) -> bool {
    value.is_ascii() && http::HeaderValue::from_str(value).is_ok()
}

impl Rules {
    pub fn new(sections: &[RuleSection]) -> Result<Rules, RuleError> {
        let mut rules = Vec::new();
        for (index, r) in sections.iter().enumerate() {
            let err = |message: String| RuleError { index, message };
            let glob = GlobBuilder::new(&r.pattern)
                .literal_separator(true)
                .build()
                .map_err(|e| {
                    err(format!(
                        "`match` pattern `{}` is not a valid glob ({}); fix the pattern, e.g. \"videos/**/*.mp4\"",
                        r.pattern,
                        e.kind()
                    ))
                })?;
            let options = [
                ("cache_control", &r.cache_control),
                ("content_type", &r.content_type),
                ("storage_class", &r.storage_class),
                ("content_disposition", &r.content_disposition),
            ];
            for (name, value) in options {
                if let Some(v) = value {
                    if v.is_empty() || !header_ok(v) {
                        return Err(err(format!(
                            "`{name}` is {v:?}, which cannot be sent as an HTTP header (only visible ASCII characters on one line); fix or remove it"
                        )));
                    }
                }
            }
            if options.iter().all(|(_, v)| v.is_none()) {
                return Err(err(format!(
                    "the rule for `{}` sets nothing; give at least one of cache_control, content_type, storage_class, content_disposition",
                    r.pattern
                )));
            }
            rules.push((glob.compile_matcher(), r.clone()));
        }
        Ok(Rules { rules })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The first rule matching `rel`, with its index.
    pub fn first_match(&self, rel: &RelPath) -> Option<(usize, &RuleSection)> {
        self.rules
            .iter()
            .enumerate()
            .find(|(_, (m, _))| m.is_match(rel.as_str()))
            .map(|(i, (_, r))| (i, r))
    }

    /// The options of `rel`: the first matching rule over the defaults.
    pub fn options_for(
        &self,
        rel: &RelPath,
        cache_control: Option<&str>,
        storage_class: Option<&str>,
    ) -> ObjectOptions {
        let guessed = mime_guess::from_path(rel.as_str())
            .first_or_octet_stream()
            .essence_str()
            .to_string();
        let mut o = ObjectOptions {
            content_type: guessed,
            cache_control: cache_control.map(str::to_string),
            storage_class: storage_class.map(str::to_string),
            content_disposition: None,
            rule: None,
        };
        if let Some((i, r)) = self.first_match(rel) {
            o.rule = Some(i);
            if let Some(v) = &r.content_type {
                o.content_type = v.clone();
            }
            if let Some(v) = &r.cache_control {
                o.cache_control = Some(v.clone());
            }
            if let Some(v) = &r.storage_class {
                o.storage_class = Some(v.clone());
            }
            if let Some(v) = &r.content_disposition {
                o.content_disposition = Some(v.clone());
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(pattern: &str) -> RuleSection {
        RuleSection {
            pattern: pattern.into(),
            cache_control: None,
            content_type: None,
            storage_class: None,
            content_disposition: None,
        }
    }

    fn rel(s: &str) -> RelPath {
        RelPath::parse(s).unwrap()
    }

    #[test]
    fn first_match_wins_over_the_defaults() {
        let rules = Rules::new(&[
            RuleSection {
                storage_class: Some("GLACIER_IR".into()),
                ..rule("archive/**")
            },
            RuleSection {
                cache_control: Some("public, max-age=60".into()),
                content_disposition: Some("attachment".into()),
                ..rule("**/*.mp4")
            },
            RuleSection {
                content_type: Some("application/x-never".into()),
                ..rule("**/*.mp4")
            },
        ])
        .unwrap();
        let o = rules.options_for(&rel("videos/a.mp4"), Some("max-age=1"), Some("STANDARD"));
        assert_eq!(o.rule, Some(1));
        assert_eq!(o.content_type, "video/mp4");
        assert_eq!(o.cache_control.as_deref(), Some("public, max-age=60"));
        assert_eq!(o.storage_class.as_deref(), Some("STANDARD"));
        assert_eq!(o.content_disposition.as_deref(), Some("attachment"));
        let o = rules.options_for(&rel("archive/x/a.mp4"), None, None);
        assert_eq!(o.rule, Some(0));
        assert_eq!(o.storage_class.as_deref(), Some("GLACIER_IR"));
        assert_eq!(o.cache_control, None);
        let o = rules.options_for(&rel("img/a.png"), Some("max-age=1"), None);
        assert_eq!(o.rule, None);
        assert_eq!(o.content_type, "image/png");
        assert_eq!(o.cache_control.as_deref(), Some("max-age=1"));
    }

    #[test]
    fn globs_do_not_cross_directories_with_one_star() {
        let rules = Rules::new(&[RuleSection {
            content_type: Some("text/plain".into()),
            ..rule("*.txt")
        }])
        .unwrap();
        assert!(rules.first_match(&rel("a.txt")).is_some());
        assert!(rules.first_match(&rel("d/a.txt")).is_none());
    }

    #[test]
    fn bad_rules_are_named() {
        let e = Rules::new(&[rule("a/**")]).unwrap_err();
        assert_eq!(e.index, 0);
        assert!(e.to_string().contains("sets nothing"), "{e}");
        let e = Rules::new(&[
            RuleSection {
                cache_control: Some("x".into()),
                ..rule("ok/**")
            },
            RuleSection {
                cache_control: Some("x".into()),
                ..rule("[")
            },
        ])
        .unwrap_err();
        assert_eq!(e.index, 1);
        assert!(
            e.to_string().starts_with("`rules[1]`: `match` pattern `[`"),
            "{e}"
        );
        let e = Rules::new(&[RuleSection {
            content_disposition: Some("bad\nvalue".into()),
            ..rule("**")
        }])
        .unwrap_err();
        assert!(
            e.to_string().contains(
                "`content_disposition` is \"bad\\nvalue\", which cannot be sent as an HTTP header"
            ),
            "{e}"
        );
        // Taken by `HeaderValue`, but not by the request signature.
        let e = Rules::new(&[RuleSection {
            cache_control: Some("max\u{2011}age=60".into()),
            ..rule("**")
        }])
        .unwrap_err();
        assert!(
            e.to_string().contains("cannot be sent as an HTTP header"),
            "{e}"
        );
    }
}
