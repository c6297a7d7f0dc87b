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
        Normalize::Phone => phone(raw, country).map(Cow::Owned),
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

/// E.164: `+` then the country code and number, 8 to 15 digits in all.
///
/// Punctuation and spaces are dropped and an extension (`x12`, `ext. 12`) is cut off. A number
/// with `+` or `00` in front carries its own country code; otherwise one national trunk `0` is
/// dropped and `country` is put in front (for country 1, an 11-digit number starting with 1
/// already has it).
pub fn phone(raw: &str, country: &str) -> Result<String, Dropped> {
    let t = raw.trim();
    if t.is_empty() {
        return Err(Dropped::Empty);
    }
    let number = match t.find(|c: char| c.is_alphabetic()) {
        Some(i) => &t[..i],
        None => t,
    };
    let international = number.trim_start().starts_with('+');
    let mut digits: String = number.chars().filter(|c| c.is_ascii_digit()).collect();
    if digits.is_empty() {
        return Err(Dropped::Invalid);
    }
    if !international {
        if let Some(rest) = digits.strip_prefix("00") {
            digits = rest.to_string();
        } else if country == "1" && digits.len() == 11 && digits.starts_with('1') {
            // Already carries the country code.
        } else {
            let national = digits.strip_prefix('0').unwrap_or(&digits);
            digits = format!("{country}{national}");
        }
    }
    if (8..=15).contains(&digits.len()) && !digits.starts_with('0') {
        Ok(format!("+{digits}"))
    } else {
        Err(Dropped::Invalid)
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
            "+14155550123",
            "001 415 555 0123",
            "415-555-0123 x12",
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
