//! CSV `[[sources]]` tables: files read with the delimiter, quote and header their
//! `[sources.csv]` sets, checked row by row, and registered as a table of text columns.
//!
//! CRM exports and hand-made lists arrive as CSV, and a CSV file broken half way (a row with a
//! field too many, a quote never closed, a file saved as Latin-1) must stop the run naming the
//! file and line rather than lose rows: a contact dropped here would silently never join its
//! profile. Every value is text (an empty field is NULL); queries cast what they need.

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema};

use crate::config::{csv_char, CsvOptions, SourceConfig};
use crate::error::{Error, Result};
use crate::storage::Place;

/// One parsed CSV file: its rows of fields, each with the line it starts on.
#[derive(Debug, Default, PartialEq)]
pub struct CsvRows {
    /// Fields of each row; `None` for an empty field.
    pub rows: Vec<(u64, Vec<Option<String>>)>,
}

/// Why a CSV text cannot be read: the line and what to do.
#[derive(Debug, PartialEq)]
pub struct CsvProblem {
    /// 1-based line where the problem is.
    pub line: u64,
    /// What is wrong and how to fix it.
    pub message: String,
}

/// Splits `bytes` into rows of fields by RFC 4180 rules with the given delimiter and quote.
/// Rows may end in LF or CRLF; a quoted field may hold delimiters, quotes (doubled) and line
/// breaks. Blank lines are skipped.
pub fn parse_csv(
    bytes: &[u8],
    delimiter: u8,
    quote: u8,
) -> std::result::Result<CsvRows, CsvProblem> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let text = match std::str::from_utf8(bytes) {
        Ok(text) => text,
        Err(e) => {
            let at = e.valid_up_to();
            let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count() as u64;
            return Err(CsvProblem {
                line,
                message: format!(
                    "byte {} is not UTF-8 text; save the file as UTF-8 (a CRM export saved from a spreadsheet is often Latin-1 or Windows-1252)",
                    at + 1
                ),
            });
        }
    };
    let (delimiter, quote) = (delimiter as char, quote as char);
    let mut out = CsvRows::default();
    let mut line: u64 = 1;
    let mut row: Vec<Option<String>> = Vec::new();
    let mut row_line = 1;
    let mut field = String::new();
    let mut was_quoted = false;
    let mut chars = text.chars().peekable();
    let mut at_row_start = true;
    while let Some(c) = chars.next() {
        if at_row_start {
            row_line = line;
            at_row_start = false;
        }
        if c == quote && field.is_empty() && !was_quoted {
            // A quoted field: read to its closing quote.
            was_quoted = true;
            let opened = line;
            loop {
                match chars.next() {
                    None => {
                        return Err(CsvProblem {
                            line: opened,
                            message: format!(
                                "a field opened with {quote} here is never closed; close it, or double every {quote} inside a field ({quote}{quote})"
                            ),
                        })
                    }
                    Some(q) if q == quote => {
                        if chars.peek() == Some(&quote) {
                            chars.next();
                            field.push(quote);
                        } else {
                            break;
                        }
                    }
                    Some(ch) => {
                        if ch == '\n' {
                            line += 1;
                        }
                        field.push(ch);
                    }
                }
            }
            match chars.peek() {
                None | Some('\n') | Some('\r') => {}
                Some(&next) if next == delimiter => {}
                Some(&next) => {
                    return Err(CsvProblem {
                        line,
                        message: format!(
                            "{next:?} follows a closing {quote}; a quoted field must end at the delimiter or the line end. Double a {quote} inside a field ({quote}{quote})"
                        ),
                    })
                }
            }
            continue;
        }
        if c == delimiter {
            row.push(finish(&mut field, &mut was_quoted));
        } else if c == '\n' || c == '\r' {
            if c == '\r' && chars.peek() == Some(&'\n') {
                chars.next();
            }
            let blank = row.is_empty() && field.is_empty() && !was_quoted;
            if !blank {
                row.push(finish(&mut field, &mut was_quoted));
                out.rows.push((row_line, std::mem::take(&mut row)));
            }
            line += 1;
            at_row_start = true;
        } else if c == quote {
            return Err(CsvProblem {
                line,
                message: format!(
                    "a {quote} inside an unquoted field; quote the whole field and double the {quote} inside it ({quote}{quote}), or set [sources.csv] quote to another character"
                ),
            });
        } else {
            field.push(c);
        }
    }
    if !row.is_empty() || !field.is_empty() || was_quoted {
        row.push(finish(&mut field, &mut was_quoted));
        out.rows.push((row_line, row));
    }
    Ok(out)
}

fn finish(field: &mut String, was_quoted: &mut bool) -> Option<String> {
    *was_quoted = false;
    let value = std::mem::take(field);
    (!value.is_empty()).then_some(value)
}

/// The files of a CSV source: the file it names, or every file in its folder (names starting
/// with `.` or `_` are skipped, as Spark and Delta write such files beside data).
async fn csv_files(place: &Place) -> Result<Vec<object_store::path::Path>> {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    match place.store.head(&place.prefix).await {
        Ok(meta) => return Ok(vec![meta.location]),
        Err(object_store::Error::NotFound { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let found: Vec<object_store::ObjectMeta> =
        match place.store.list(Some(&place.prefix)).try_collect().await {
            Ok(found) => found,
            Err(object_store::Error::NotFound { .. }) => Vec::new(),
            Err(e) => return Err(e.into()),
        };
    let mut files: Vec<object_store::path::Path> = found
        .into_iter()
        .map(|m| m.location)
        .filter(|p| {
            p.filename()
                .is_some_and(|n| !n.starts_with('.') && !n.starts_with('_'))
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Reads every file of CSV source `source` at `place` into one batch of text columns.
pub async fn read_csv_source(
    place: &Place,
    source: &SourceConfig,
    key: &str,
) -> Result<RecordBatch> {
    use object_store::ObjectStoreExt;
    let options: &CsvOptions = &source.csv;
    let (Some(delimiter), Some(quote)) = (csv_char(&options.delimiter), csv_char(&options.quote))
    else {
        return Err(Error::Location {
            key: key.to_string(),
            location: source.location.clone(),
            message: "[sources.csv] delimiter and quote must each be one ASCII character".into(),
        });
    };
    let files = csv_files(place).await?;
    if files.is_empty() {
        return Err(Error::Location {
            key: key.to_string(),
            location: source.location.clone(),
            message: format!(
                "no CSV file found for source `{}`; check the path, or remove the source",
                source.name
            ),
        });
    }
    let mut names: Option<(String, Vec<String>)> = None;
    let mut columns: Vec<StringBuilder> = Vec::new();
    for path in files {
        let url = place
            .url_of(&path)
            .to_string()
            .trim_end_matches('/')
            .to_string();
        let bytes = place.store.get(&path).await?.bytes().await?;
        let fail = |line: u64, message: String| Error::SourceFile {
            source_name: source.name.clone(),
            file: url.clone(),
            line,
            message,
        };
        let parsed = parse_csv(&bytes, delimiter, quote).map_err(|p| fail(p.line, p.message))?;
        let mut rows = parsed.rows.into_iter();
        let header: Vec<String> = if options.header {
            match rows.next() {
                Some((line, fields)) => {
                    let header: Vec<String> = fields
                        .into_iter()
                        .enumerate()
                        .map(|(i, f)| f.unwrap_or_else(|| format!("column_{}", i + 1)))
                        .collect();
                    let mut seen = std::collections::HashSet::new();
                    if let Some(twice) = header.iter().find(|h| !seen.insert(h.as_str())) {
                        return Err(fail(
                            line,
                            format!("the header names column `{twice}` twice; rename one"),
                        ));
                    }
                    header
                }
                None => continue,
            }
        } else {
            let width = match (&names, rows.as_slice().first()) {
                (Some((_, known)), _) => known.len(),
                (None, Some((_, first))) => first.len(),
                (None, None) => continue,
            };
            (1..=width).map(|i| format!("column_{i}")).collect()
        };
        match &names {
            None => {
                columns = header.iter().map(|_| StringBuilder::new()).collect();
                names = Some((url.clone(), header.clone()));
            }
            Some((first, known)) if *known != header => {
                return Err(fail(
                    1,
                    format!(
                        "the columns ({}) differ from those of {first} ({}); every file of a source needs the same header",
                        header.join(", "),
                        known.join(", ")
                    ),
                ));
            }
            Some(_) => {}
        }
        for (line, fields) in rows {
            if fields.len() != columns.len() {
                return Err(fail(
                    line,
                    format!(
                        "{} fields where the header has {}; quote fields that hold the delimiter {:?}, or set [sources.csv] delimiter to the file's own",
                        fields.len(),
                        columns.len(),
                        delimiter as char
                    ),
                ));
            }
            for (builder, value) in columns.iter_mut().zip(fields) {
                builder.append_option(value);
            }
        }
    }
    let Some((_, header)) = names else {
        return Err(Error::Location {
            key: key.to_string(),
            location: source.location.clone(),
            message: format!("the CSV files of source `{}` are empty", source.name),
        });
    };
    let schema = Arc::new(Schema::new(
        header
            .iter()
            .map(|h| Field::new(h, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let arrays: Vec<ArrayRef> = columns
        .into_iter()
        .map(|mut b| Arc::new(b.finish()) as ArrayRef)
        .collect();
    Ok(RecordBatch::try_new(schema, arrays)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(text: &str) -> Vec<Vec<Option<String>>> {
        parse_csv(text.as_bytes(), b',', b'"')
            .unwrap()
            .rows
            .into_iter()
            .map(|(_, r)| r)
            .collect()
    }

    #[test]
    fn quoted_fields_hold_delimiters_quotes_and_line_breaks() {
        let s = |v: &str| Some(v.to_string());
        assert_eq!(
            fields("a,b\r\n\"x, y\",\"say \"\"hi\"\"\"\n\"two\nlines\",\n"),
            vec![
                vec![s("a"), s("b")],
                vec![s("x, y"), s("say \"hi\"")],
                vec![s("two\nlines"), None],
            ]
        );
        // No final line break; a blank line is skipped.
        assert_eq!(fields("a\n\nb"), vec![vec![s("a")], vec![s("b")]]);
    }

    #[test]
    fn problems_name_their_line() {
        let p = parse_csv(b"a,b\n1,2\n\"open,3\n4,5\n", b',', b'"').unwrap_err();
        assert_eq!(p.line, 3, "{}", p.message);
        let p = parse_csv(b"a,b\n1,x\"y\n", b',', b'"').unwrap_err();
        assert_eq!(p.line, 2, "{}", p.message);
        let p = parse_csv(b"a\n\"q\"x\n", b',', b'"').unwrap_err();
        assert_eq!(p.line, 2, "{}", p.message);
        let p = parse_csv(b"a\nok\n\xE9t\xE9\n", b',', b'"').unwrap_err();
        assert_eq!(p.line, 3, "{}", p.message);
        // The line of a row starting after a multi-line field is counted from the file's top.
        let rows = parse_csv(b"a\n\"1\n2\"\n3\n", b',', b'"').unwrap().rows;
        assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), [1, 2, 4]);
    }
}
