//! Identifier normalisers: the same person typed the same identifier many ways.
//!
//! They return `Cow`: most values arrive already clean, and borrowing them saves an allocation
//! per value on the resolver's hot path.

use std::borrow::Cow;

use crate::config::Normalize;

/// Why a value was dropped instead of normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// Empty, or only white space.
    Empty,
    /// Not shaped like a value of its kind (an email without `@`, a phone with too few digits).
    Invalid,
}

/// Normalises `raw` with `how`; `country` completes phone numbers given without a country code.
pub fn normalize<'a>(how: Normalize, raw: &'a str, country: &str) -> Result<Cow<'a, str>, Dropped> {
    match how {
        Normalize::None => {
            if raw.is_empty() {
                Err(Dropped::Empty)
            } else {
                Ok(Cow::Borrowed(raw))
            }
        }
        Normalize::Trim => {
            let t = raw.trim();
            if t.is_empty() {
                Err(Dropped::Empty)
            } else {
                Ok(Cow::Borrowed(t))
            }
        }
        Normalize::Email => email(raw),
        Normalize::Phone => phone_cow(raw, country),
    }
}

/// Trim and lowercase; a value without a local part and a domain around one `@` is invalid.
pub fn email(raw: &str) -> Result<Cow<'_, str>, Dropped> {
    let t = raw.trim();
    if t.is_empty() {
        return Err(Dropped::Empty);
    }
    match t.split_once('@') {
        Some((local, domain))
            if !local.is_empty() && !domain.is_empty() && !domain.contains('@') => {}
        _ => return Err(Dropped::Invalid),
    }
    if t.chars().any(char::is_uppercase) {
        Ok(Cow::Owned(t.to_lowercase()))
    } else {
        Ok(Cow::Borrowed(t))
    }
}

/// E.164 by libphonenumber's rules (the `phonenumber` crate and its per-country metadata).
///
/// A value already written as E.164 (`+`, a non-zero digit, 8 to 15 digits in all, nothing
/// else) is taken as it is: most SDKs send that form, and parsing costs microseconds per value
/// on the resolver's hot path. Any other value is parsed: a number with `+` carries its own
/// country code (a national trunk prefix after it, as in `+44 (0) 20…`, is dropped); a number
/// without one is read as dialled in the main country of the calling code `country` (`"39"` →
/// Italy, so `06…` keeps its leading 0; `"1"` → the United States, so `011` is the
/// international prefix). Failing that, a leading `00` is read as the international prefix used
/// by most of the world. The result must be a valid number for its country's metadata; an
/// extension (`x12`, `ext. 12`) is dropped.
pub fn phone(raw: &str, country: &str) -> Result<String, Dropped> {
    phone_cow(raw, country).map(Cow::into_owned)
}

/// The longest text worth parsing as a phone number (a number with an extension and spacing
/// fits easily); longer values are not phone numbers and would only cost parsing time.
const MAX_PHONE_TEXT: usize = 64;

fn phone_cow<'a>(raw: &'a str, country: &str) -> Result<Cow<'a, str>, Dropped> {
    let t = raw.trim();
    if t.is_empty() {
        return Err(Dropped::Empty);
    }
    if is_e164(t) {
        return Ok(Cow::Borrowed(t));
    }
    if t.len() > MAX_PHONE_TEXT {
        return Err(Dropped::Invalid);
    }
    let international = t.starts_with('+');
    let region = if international {
        None
    } else {
        main_region(country)
    };
    let parsed = match (international, region) {
        (false, None) => valid_e164(&format!("+{country} {t}"), None),
        _ => valid_e164(t, region),
    };
    if let Some(number) = parsed {
        return Ok(Cow::Owned(number));
    }
    if !international {
        if let Some(rest) = t.strip_prefix("00") {
            if let Some(number) = valid_e164(&format!("+{rest}"), None) {
                return Ok(Cow::Owned(number));
            }
        }
    }
    Err(Dropped::Invalid)
}

/// `+`, a digit 1-9 (no calling code starts with 0), then digits: 8 to 15 digits in all.
fn is_e164(t: &str) -> bool {
    let Some(digits) = t.strip_prefix('+') else {
        return false;
    };
    (8..=15).contains(&digits.len())
        && !digits.starts_with('0')
        && digits.bytes().all(|b| b.is_ascii_digit())
}

/// Parses `text` (as dialled in `region`, or international when `None`) and formats it as
/// E.164 when the metadata says it is a valid number.
fn valid_e164(text: &str, region: Option<phonenumber::country::Id>) -> Option<String> {
    let number = phonenumber::parse(region, text).ok()?;
    if !plans::is_valid(&number) {
        return None;
    }
    let e164 = number.format().mode(phonenumber::Mode::E164).to_string();
    // What is kept must read back unchanged: normalising twice gives the same value.
    let digits = e164.strip_prefix('+')?;
    (!digits.is_empty() && digits.len() <= 15 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then_some(e164)
}

/// The main region of a calling code ("1" → US, "44" → GB, "39" → IT), from the metadata;
/// `None` for a code with no geographic region (e.g. "800") or no region at all.
pub fn main_region(calling_code: &str) -> Option<phonenumber::country::Id> {
    static REGIONS: std::sync::OnceLock<std::collections::HashMap<u16, phonenumber::country::Id>> =
        std::sync::OnceLock::new();
    let regions = REGIONS.get_or_init(|| {
        let mut regions = std::collections::HashMap::new();
        let database = &*phonenumber::metadata::DATABASE;
        for meta in database.iter() {
            let Ok(id) = meta.id().parse::<phonenumber::country::Id>() else {
                continue;
            };
            let code = meta.country_code();
            let only = database.region(&code).is_some_and(|r| r.len() == 1);
            if meta.is_main_country_for_code() || only {
                regions.insert(code, id);
            }
        }
        regions
    });
    regions.get(&calling_code.parse::<u16>().ok()?).copied()
}

/// libphonenumber's validity check (`is_valid`: the number fits one of its region's number
/// types) over regular expressions compiled once per calling code. The crate's own check looks
/// every pattern up by its text in one locked cache, which costs microseconds per number and
/// makes threads wait on each other; this is the same rule without that.
mod plans {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use phonenumber::metadata::{Descriptor, Metadata, DATABASE};
    use regex::Regex;

    /// One number type's pattern and the lengths its national numbers may have.
    struct Pattern {
        regex: Regex,
        lengths: Vec<u16>,
    }

    impl Pattern {
        fn new(descriptor: &Descriptor) -> Option<Pattern> {
            Some(Pattern {
                regex: compile(descriptor.national_number().as_str())?,
                lengths: descriptor.possible_length().to_vec(),
            })
        }

        /// As the crate matches a descriptor: a possible length, and the pattern from the start.
        fn matches(&self, national: &str) -> bool {
            (self.lengths.is_empty() || self.lengths.contains(&(national.len() as u16)))
                && self.regex.is_match(national)
        }
    }

    /// A region's numbering plan.
    struct Plan {
        leading: Option<Regex>,
        general: Option<Pattern>,
        kinds: Vec<Pattern>,
    }

    impl Plan {
        fn new(meta: &Metadata) -> Plan {
            let d = meta.descriptors();
            // The order of libphonenumber's number-type check; any match makes a number valid.
            let kinds = [
                d.premium_rate(),
                d.toll_free(),
                d.shared_cost(),
                d.voip(),
                d.personal_number(),
                d.pager(),
                d.uan(),
                d.voicemail(),
                d.fixed_line(),
                d.mobile(),
            ];
            Plan {
                leading: meta.leading_digits().and_then(|r| compile(r.as_str())),
                general: Pattern::new(d.general()),
                kinds: kinds
                    .into_iter()
                    .flatten()
                    .filter_map(Pattern::new)
                    .collect(),
            }
        }

        fn fits(&self, national: &str) -> bool {
            self.general.as_ref().is_some_and(|g| g.matches(national))
                && self.kinds.iter().any(|k| k.matches(national))
        }
    }

    /// Anchored at the start, as the crate matches (its leftmost match must start there); the
    /// metadata's patterns are written with white space for reading.
    fn compile(pattern: &str) -> Option<Regex> {
        regex::RegexBuilder::new(&format!("^(?:{pattern})"))
            .ignore_whitespace(true)
            .build()
            .ok()
    }

    /// The plans of a calling code's regions, in the metadata's order (main region first).
    fn plans(code: u16) -> Arc<Vec<Plan>> {
        static PLANS: OnceLock<Mutex<HashMap<u16, Arc<Vec<Plan>>>>> = OnceLock::new();
        let cache = PLANS.get_or_init(Default::default);
        let mut cache = cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        cache
            .entry(code)
            .or_insert_with(|| {
                let regions = DATABASE.region(&code).unwrap_or_default();
                let metas: Vec<&Metadata> = if regions.len() == 1 && regions[0] == "001" {
                    DATABASE
                        .by_code(&code)
                        .unwrap_or_default()
                        .into_iter()
                        .take(1)
                        .collect()
                } else {
                    regions.iter().filter_map(|r| DATABASE.by_id(*r)).collect()
                };
                Arc::new(metas.into_iter().map(Plan::new).collect())
            })
            .clone()
    }

    /// Whether `number` is valid: its region is the one whose leading digits it starts with or
    /// whose plan it fits (the only one when the code has one region), and it fits that plan.
    pub(super) fn is_valid(number: &phonenumber::PhoneNumber) -> bool {
        let national = number.national().to_string();
        let plans = plans(number.code().value());
        if plans.len() == 1 {
            return plans[0].fits(&national);
        }
        plans.iter().any(|plan| match &plan.leading {
            Some(leading) => leading.is_match(&national) && plan.fits(&national),
            None => plan.fits(&national),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_trimmed_and_lowercased() {
        assert_eq!(
            email("  Ada.Lovelace@Example.COM ").unwrap(),
            "ada.lovelace@example.com"
        );
        assert_eq!(email("BOB@MAIL.TEST").unwrap(), "bob@mail.test");
        assert_eq!(email("\tx@y.z\n").unwrap(), "x@y.z");
        assert_eq!(email("   "), Err(Dropped::Empty));
        assert_eq!(email("not-an-email"), Err(Dropped::Invalid));
        assert_eq!(email("@example.com"), Err(Dropped::Invalid));
        assert_eq!(email("a@b@c"), Err(Dropped::Invalid));
    }

    #[test]
    fn phones_become_e164() {
        for raw in [
            "+1 (415) 555-0123",
            "(415) 555-0123",
            "415.555.0123",
            "14155550123",
            "1-415-555-0123",
            "+14155550123",
            " +14155550123 ",
            "001 415 555 0123",
            "415-555-0123 x12",
            "+1 415 555 0123 ext. 5",
            "tel:+1-415-555-0123",
        ] {
            assert_eq!(phone(raw, "1").unwrap(), "+14155550123", "{raw}");
        }
        // A UK number written nationally, with its trunk 0, and internationally.
        assert_eq!(phone("020 7946 0958", "44").unwrap(), "+442079460958");
        assert_eq!(phone("+44 20 7946 0958", "1").unwrap(), "+442079460958");
        assert_eq!(phone("0044 20 7946 0958", "1").unwrap(), "+442079460958");
        assert_eq!(phone("12345", "1"), Err(Dropped::Invalid));
        assert_eq!(phone("+1234567890123456", "1"), Err(Dropped::Invalid));
        assert_eq!(phone("n/a", "1"), Err(Dropped::Invalid));
        assert_eq!(phone("  ", "1"), Err(Dropped::Empty));
    }

    /// Vectors worked out from the numbering plans (ITU-T E.164 and each country's national
    /// plan as libphonenumber's metadata encodes it), not from this code's output.
    #[test]
    fn phones_follow_each_countrys_numbering_plan() {
        // Italy keeps the leading 0 of geographic numbers in international form.
        assert_eq!(phone("06 1234 5678", "39").unwrap(), "+390612345678");
        assert_eq!(phone("+39 06 1234 5678", "1").unwrap(), "+390612345678");
        // "(0)" is the UK trunk prefix written inside an international number: it is dropped.
        assert_eq!(phone("+44 (0) 20 7946 0958", "1").unwrap(), "+442079460958");
        assert_eq!(phone("+44 020 7946 0958", "1").unwrap(), "+442079460958");
        // 011 is the international prefix dialled from the US and Canada.
        assert_eq!(phone("011 44 20 7946 0958", "1").unwrap(), "+442079460958");
        // Germany: trunk 0 dropped, area code 30 (Berlin); also "(0)" after +49.
        assert_eq!(phone("030 123456", "49").unwrap(), "+4930123456");
        assert_eq!(phone("+49 (0)30 123456", "1").unwrap(), "+4930123456");
        // France: trunk 0 dropped from a mobile (06) and a Paris (01) number.
        assert_eq!(phone("06 12 34 56 78", "33").unwrap(), "+33612345678");
        assert_eq!(phone("01 23 45 67 89", "33").unwrap(), "+33123456789");
        // Russia: trunk prefix 8.
        assert_eq!(phone("8 912 345 67 89", "7").unwrap(), "+79123456789");
        // Numbers that cannot exist in the North American plan (area codes never start with
        // 0 or 1; 555 is not an area code).
        for junk in ["123-456-7890", "555-555-5555", "000-000-0000", "0612345678"] {
            assert_eq!(phone(junk, "1"), Err(Dropped::Invalid), "{junk}");
        }
        for junk in [
            "+",
            "++1415",
            "call me",
            "+1 (415) 555-01",
            &"9".repeat(200),
        ] {
            assert_eq!(phone(junk, "1"), Err(Dropped::Invalid), "{junk}");
        }
        // Already E.164: taken as is, without parsing.
        assert_eq!(phone("+390612345678", "1").unwrap(), "+390612345678");
        assert!(matches!(
            normalize(Normalize::Phone, "+442079460958", "1"),
            Ok(Cow::Borrowed("+442079460958"))
        ));
        // A calling code maps to its main region.
        assert_eq!(
            main_region("1").map(|r| r.as_ref().to_string()).as_deref(),
            Some("US")
        );
        assert_eq!(
            main_region("44").map(|r| r.as_ref().to_string()).as_deref(),
            Some("GB")
        );
        assert_eq!(
            main_region("49").map(|r| r.as_ref().to_string()).as_deref(),
            Some("DE")
        );
        assert_eq!(main_region("800"), None);
        assert_eq!(main_region("x"), None);
    }

    /// The compiled check gives the crate's answer on valid, invalid and odd numbers.
    #[test]
    fn compiled_validity_agrees_with_the_crate() {
        let mut checked = 0;
        for (text, region) in [
            ("+14155550123", None),
            ("+12112000000", None),
            ("+15555555555", None),
            ("+16135550123", None),
            ("+12642351234", None),
            ("+18765551234", None),
            ("+442079460958", None),
            ("+441481256789", None),
            ("+447700900123", None),
            ("+390612345678", None),
            ("+393123456789", None),
            ("+4930123456", None),
            ("+33612345678", None),
            ("+79123456789", None),
            ("+77172345678", None),
            ("+80012345678", None),
            ("+6834002", None),
            ("+61212345678", None),
            ("+999123456", None),
            ("0612345678", Some("US")),
            ("06 1234 5678", Some("VA")),
        ] {
            let region = region.map(|r| r.parse::<phonenumber::country::Id>().unwrap());
            if let Ok(number) = phonenumber::parse(region, text) {
                assert_eq!(
                    plans::is_valid(&number),
                    phonenumber::is_valid(&number),
                    "{text}"
                );
                checked += 1;
            }
        }
        assert!(checked > 15, "{checked}");
    }

    proptest::proptest! {
        /// The compiled check agrees with the crate's on any digits after any calling code.
        #[test]
        fn compiled_validity_agrees_on_any_number(text in "\\+[1-9][0-9]{6,14}") {
            if let Ok(number) = phonenumber::parse(None, &text) {
                proptest::prop_assert_eq!(plans::is_valid(&number), phonenumber::is_valid(&number), "{}", text);
            }
        }

        /// Any text: no panic, and what comes out normalises to itself.
        #[test]
        fn normalising_never_panics_and_is_idempotent(
            raw in proptest::prop_oneof![
                ".{0,40}",
                "[+0-9 ().x-]{0,24}",
                "(\\+|00|011)?[1-9][0-9 -]{6,16}",
                "[A-Za-z0-9._ ]{0,12}@[A-Za-z0-9.]{0,12}",
            ],
            country in proptest::prop_oneof![
                proptest::strategy::Just("1".to_string()),
                proptest::strategy::Just("44".to_string()),
                proptest::strategy::Just("39".to_string()),
                "[0-9]{1,3}",
            ],
        ) {
            for how in [Normalize::Phone, Normalize::Email, Normalize::Trim, Normalize::None] {
                if let Ok(once) = normalize(how, &raw, &country) {
                    let twice = normalize(how, &once, &country);
                    proptest::prop_assert_eq!(twice.as_deref(), Ok(once.as_ref()), "{:?} {:?}", how, raw);
                    if how == Normalize::Phone {
                        proptest::prop_assert!(is_e164(&once) || once.len() < 9, "{}", once);
                    }
                }
            }
        }
    }

    #[test]
    fn trim_and_none() {
        assert_eq!(normalize(Normalize::Trim, "  u-1 ", "1").unwrap(), "u-1");
        assert_eq!(normalize(Normalize::Trim, "  ", "1"), Err(Dropped::Empty));
        assert_eq!(normalize(Normalize::None, " U-1 ", "1").unwrap(), " U-1 ");
        assert_eq!(normalize(Normalize::None, "", "1"), Err(Dropped::Empty));
        assert_eq!(
            normalize(Normalize::Email, " A@B.C ", "1").unwrap(),
            "a@b.c"
        );
    }
}
