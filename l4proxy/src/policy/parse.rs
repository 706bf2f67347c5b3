//! From a policy's text to its raw types, finding as many errors as can be
//! found honestly in one go:
//!
//! 1. The whole text is read once as an outline ([`raw::Outline`]): its
//!    syntax, the top-level fields, and the upstreams' names. An error here
//!    is the only one reported: past a syntax error nothing can be trusted.
//! 2. Each rule, route and upstream is read on its own, from its own span
//!    of the text (serde_json's `RawValue` keeps the exact text), so that
//!    each one's first error is reported with its path, line and column.
//!    Within one element serde stops at its first error.
//! 3. Only when every element reads cleanly do the checks across them
//!    (`check`: names, duplicates, overlaps, loops) run: with an element
//!    missing, they would report errors that are not there.
//!
//! An element is read from a slice of the same text, so serde_json counts
//! lines and columns from the element's first byte; adding where that byte
//! is in the whole text gives exactly the place a single pass would have
//! reported.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::{Location, PolicyError, raw};

/// The raw policy in `text`, or every error found (never none), in the
/// order of the text.
pub(super) fn read(text: &str) -> Result<raw::Policy, Vec<PolicyError>> {
    if text.trim().is_empty() {
        return Err(vec![PolicyError::Invalid {
            at: Location::default(),
            reason: "policy is empty; expected a JSON object with \"intercept\" and \"upstreams\""
                .to_owned(),
        }]);
    }
    let outline = outline(text).map_err(|err| vec![err])?;
    let lines = Lines::of(text);
    let mut errors = Vec::new();
    let intercept: Vec<_> = (outline.intercept.iter().enumerate())
        .filter_map(|(i, span)| element(text, &lines, span, format!("intercept[{i}]"), &mut errors))
        .collect();
    let routes: Vec<_> = (outline.routes.iter().enumerate())
        .filter_map(|(i, span)| element(text, &lines, span, format!("routes[{i}]"), &mut errors))
        .collect();
    let upstreams: BTreeMap<_, _> = (outline.upstreams.into_iter())
        .filter_map(|(name, span)| {
            let upstream = element(text, &lines, span, format!("upstreams.{name}"), &mut errors)?;
            Some((name, upstream))
        })
        .collect();
    if !errors.is_empty() {
        // The sections may come in any order in the text.
        errors.sort_by_key(PolicyError::line_column);
        return Err(errors);
    }
    Ok(raw::Policy {
        intercept,
        routes,
        upstreams,
    })
}

fn outline(text: &str) -> Result<raw::Outline<'_>, PolicyError> {
    let mut de = serde_json::Deserializer::from_str(text);
    let raw::Object(outline) = serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = join("", err.path());
        PolicyError::json(err.into_inner(), (!path.is_empty()).then_some(path), (1, 0))
    })?;
    de.end()
        .map_err(|err| PolicyError::json(err, None, (1, 0)))?;
    Ok(outline)
}

/// One element, read from `span` (a slice of `text`); its error, placed in
/// `text` and under `path`, goes in `errors`.
fn element<'a, T: Deserialize<'a>>(
    text: &str,
    lines: &Lines,
    span: &'a RawValue,
    path: String,
    errors: &mut Vec<PolicyError>,
) -> Option<T> {
    let slice = span.get();
    // `RawValue` borrows from the text it was read from: the slice's
    // address is within `text`.
    let start = (slice.as_ptr() as usize).wrapping_sub(text.as_ptr() as usize);
    debug_assert!(start + slice.len() <= text.len(), "a span outside the text");
    let mut de = serde_json::Deserializer::from_str(slice);
    serde_path_to_error::deserialize(&mut de)
        .map_err(|err| {
            let path = join(&path, err.path());
            let origin = lines.place(start);
            errors.push(PolicyError::json(err.into_inner(), Some(path), origin));
        })
        .ok()
}

/// `prefix` followed by serde_path_to_error's path, as messages write it:
/// `intercept[0].ports[1]`, `upstreams.web.servers[0]`.
fn join(prefix: &str, path: &serde_path_to_error::Path) -> String {
    let rest = path.to_string();
    match path.iter().next() {
        None => prefix.to_owned(),
        Some(serde_path_to_error::Segment::Seq { .. }) => format!("{prefix}{rest}"),
        Some(_) if prefix.is_empty() => rest,
        Some(_) => format!("{prefix}.{rest}"),
    }
}

/// Where each line of a text starts, to place many errors in it without
/// reading it again for each.
struct Lines(Vec<usize>);

impl Lines {
    fn of(text: &str) -> Lines {
        let after_newlines = (text.bytes().enumerate())
            .filter(|&(_, b)| b == b'\n')
            .map(|(i, _)| i + 1);
        Lines(std::iter::once(0).chain(after_newlines).collect())
    }

    /// Where the byte at `offset` is: the 1-based line, and the bytes
    /// before it on its line (serde_json counts columns in bytes too).
    fn place(&self, offset: usize) -> (usize, usize) {
        // The number of lines starting at or before `offset`; the first
        // starts at 0, so it is at least 1.
        let line = self.0.partition_point(|&start| start <= offset);
        (line, offset - self.0[line - 1])
    }
}

#[cfg(test)]
mod tests {
    use super::Lines;

    #[test]
    fn places_count_lines_from_1_and_bytes_before_on_the_line() {
        let lines = Lines::of("ab\n\ncd\né\n");
        assert_eq!(lines.place(0), (1, 0));
        assert_eq!(lines.place(2), (1, 2));
        assert_eq!(lines.place(3), (2, 0));
        assert_eq!(lines.place(4), (3, 0));
        assert_eq!(lines.place(5), (3, 1));
        // Bytes, as serde_json counts: é is two.
        assert_eq!(lines.place(9), (4, 2));
        assert_eq!(lines.place(10), (5, 0));
    }
}
