//! The SAS emoji table ([spec: SAS method `emoji`](https://spec.matrix.org/v1.19/client-server-api/#sas-method-emoji)),
//! read from the specification's own `sas-emoji.json`, shipped inside this crate (`data/`, with
//! its Apache-2.0 licence), with the spec's translations of the descriptions.
//!
//! ```
//! use mxverify_proto::emoji;
//!
//! let dog = emoji::emoji(0);
//! assert_eq!((dog.symbol, dog.description), ("🐶", "Dog"));
//! assert_eq!(dog.name_in("de"), Some("Hund"));
//! assert_eq!(dog.name_in("pt-BR"), Some("Cachorro"));
//! assert_eq!(dog.name_or_english("xx"), "Dog");
//! assert!(emoji::languages().any(|l| l == "fr"));
//! ```

use std::collections::BTreeMap;
use std::sync::OnceLock;

use serde::Deserialize;

const TABLE_JSON: &str = include_str!("../data/sas-emoji.json");

/// One of the 64 SAS emoji.
///
/// Spec: [SAS method `emoji`](https://spec.matrix.org/v1.19/client-server-api/#sas-method-emoji).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct Emoji {
    /// Index 0..=63 into the table: what both sides must agree on.
    pub index: u8,
    /// The emoji itself (may contain U+FE0F).
    pub symbol: &'static str,
    /// The English description from the spec.
    pub description: &'static str,
}

impl Emoji {
    /// The description in language `lang`, from the spec's translations: a tag such as `de`,
    /// `pt_BR` or `pt-BR`; a regional tag without a translation of its own falls back to its
    /// language (`de-AT` → `de`). `None` when the spec has no translation (some entries are
    /// untranslated).
    #[must_use]
    pub fn name_in(&self, lang: &str) -> Option<&'static str> {
        translated_description(self.index, lang)
    }

    /// [`Emoji::name_in`], or the English description when there is no translation.
    #[must_use]
    pub fn name_or_english(&self, lang: &str) -> &'static str {
        self.name_in(lang).unwrap_or(self.description)
    }
}

#[derive(Deserialize)]
struct Entry {
    number: u8,
    emoji: String,
    description: String,
    #[serde(default)]
    translated_descriptions: BTreeMap<String, Option<String>>,
}

struct Table {
    entries: Vec<(Emoji, BTreeMap<String, Option<String>>)>,
    languages: Vec<String>,
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        // The JSON is compiled in and checked by the tests below, so a failure here is a build defect.
        let raw: Vec<Entry> = serde_json::from_str(TABLE_JSON).expect("sas-emoji.json is valid");
        let entries: Vec<(Emoji, BTreeMap<String, Option<String>>)> = raw
            .into_iter()
            .enumerate()
            .map(|(i, e)| {
                assert_eq!(usize::from(e.number), i, "sas-emoji.json is ordered by number");
                let emoji = Emoji {
                    index: e.number,
                    symbol: Box::leak(e.emoji.into_boxed_str()),
                    description: Box::leak(e.description.into_boxed_str()),
                };
                (emoji, e.translated_descriptions)
            })
            .collect();
        let mut languages: Vec<String> = entries.iter().flat_map(|(_, t)| t.keys().cloned()).collect();
        languages.sort();
        languages.dedup();
        Table { entries, languages }
    })
}

/// The emoji at `index` (taken modulo 64, since indices are 6-bit values).
///
/// Spec: [SAS method `emoji`](https://spec.matrix.org/v1.19/client-server-api/#sas-method-emoji).
#[must_use]
pub fn emoji(index: u8) -> Emoji {
    table().entries[usize::from(index & 63)].0.clone()
}

/// The description of emoji `index` in language `lang` (see [`Emoji::name_in`]), if the spec has
/// a translation for it.
///
/// Spec: [SAS method `emoji`](https://spec.matrix.org/v1.19/client-server-api/#sas-method-emoji).
#[must_use]
pub fn translated_description(index: u8, lang: &str) -> Option<&'static str> {
    let translations = &table().entries[usize::from(index & 63)].1;
    let tag = lang.replace('-', "_");
    let found = match translations.get(&tag) {
        Some(t) => t.as_deref(),
        None => {
            let primary = tag.split('_').next().unwrap_or_default();
            translations.get(primary).and_then(|t| t.as_deref())
        }
    };
    found.filter(|t| !t.is_empty())
}

/// The languages the spec translates the emoji descriptions into (tags such as `de`, `pt_BR`),
/// sorted.
///
/// Spec: [SAS method `emoji`](https://spec.matrix.org/v1.19/client-server-api/#sas-method-emoji).
pub fn languages() -> impl Iterator<Item = &'static str> {
    table().languages.iter().map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_spec_listing() {
        // VECTORS.md V11 spot checks, including the VS-16 entries (EM-02).
        assert_eq!(emoji(0).description, "Dog");
        assert_eq!(emoji(0).symbol, "\u{1F436}");
        assert_eq!(emoji(21).symbol, "\u{2601}\u{FE0F}");
        assert_eq!(emoji(38).symbol, "\u{231B}");
        assert_eq!(emoji(63).description, "Pin");
        assert_eq!(emoji(53).description, "Aeroplane");
        assert_eq!(translated_description(0, "de"), Some("Hund"));
        assert_eq!(translated_description(0, "szl"), None);
        assert_eq!(translated_description(0, "xx"), None);
        let with_vs16: Vec<u8> = (0..64).filter(|&i| emoji(i).symbol.contains('\u{FE0F}')).collect();
        assert_eq!(with_vs16, [21, 29, 37, 43, 45, 49, 53]);
    }

    #[test]
    fn names_in_other_languages() {
        let dog = emoji(0);
        assert_eq!(dog.name_in("pt_BR"), Some("Cachorro"));
        assert_eq!(dog.name_in("pt-BR"), Some("Cachorro"));
        assert_eq!(dog.name_in("pt"), Some("Cão"));
        assert_eq!(dog.name_in("de-AT"), Some("Hund"), "a region falls back to its language");
        assert_eq!(dog.name_or_english("szl"), "Dog");
        let langs: Vec<&str> = languages().collect();
        assert_eq!(langs.len(), 32);
        assert!(langs.windows(2).all(|w| w[0] < w[1]));
        assert!(langs.contains(&"zh_Hant") && !langs.contains(&"en"));
    }
}
