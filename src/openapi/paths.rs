//! Path templates (`/pets/{id}`, `/files/{name}.json`) and how a request path matches one.

use crate::vars::percent_decode;

#[derive(Debug, Clone)]
pub(super) enum Part {
    Lit(String),
    Param(String),
}

pub(super) fn parse_template(t: &str) -> Result<Vec<Vec<Part>>, String> {
    let trimmed = t.trim_matches('/');
    if trimmed.is_empty() {
        return Ok(Vec::new());
    }
    trimmed
        .split('/')
        .map(|seg| {
            let mut parts = Vec::new();
            let mut rest = seg;
            while let Some(open) = rest.find('{') {
                if open > 0 {
                    parts.push(Part::Lit(rest[..open].to_owned()));
                }
                let close = rest[open..]
                    .find('}')
                    .ok_or_else(|| format!("unclosed `{{` in path `{t}`"))?;
                let name = &rest[open + 1..open + close];
                if matches!(parts.last(), Some(Part::Param(_))) {
                    return Err(format!("path `{t}`: two parameters in a row are ambiguous"));
                }
                parts.push(Part::Param(name.to_owned()));
                rest = &rest[open + close + 1..];
            }
            if !rest.is_empty() {
                parts.push(Part::Lit(percent_decode_path(rest).into_owned()));
            }
            Ok(parts)
        })
        .collect()
}

/// Matches one path segment against its template parts, pushing the parameters' values
/// (nothing when it does not match). Linear in the segment: parameters never follow each
/// other, so each literal after a parameter is taken at its leftmost occurrence past the
/// parameter's first character (which leaves the most room for the rest), and a literal
/// that ends the segment must be its suffix. No backtracking, whatever the template.
pub(super) fn match_parts(parts: &[Part], s: &str, out: &mut Vec<(String, String)>) -> bool {
    let mark = out.len();
    let ok = match_parts_greedy(parts, s, out);
    if !ok {
        out.truncate(mark);
    }
    ok
}

fn match_parts_greedy(parts: &[Part], mut s: &str, out: &mut Vec<(String, String)>) -> bool {
    let mut i = 0;
    while let Some(part) = parts.get(i) {
        match (part, parts.get(i + 1)) {
            (Part::Lit(l), _) => match s.strip_prefix(l.as_str()) {
                Some(r) => s = r,
                None => return false,
            },
            (Part::Param(n), None) => {
                if s.is_empty() {
                    return false;
                }
                out.push((n.clone(), s.to_owned()));
                return true;
            }
            (Part::Param(n), Some(Part::Lit(l))) => {
                let at = if i + 2 == parts.len() {
                    if s.len() <= l.len() || !s.ends_with(l.as_str()) {
                        return false;
                    }
                    s.len() - l.len()
                } else {
                    let Some(first) = s.chars().next().map(char::len_utf8) else {
                        return false;
                    };
                    match s[first..].find(l.as_str()) {
                        Some(j) => first + j,
                        None => return false,
                    }
                };
                out.push((n.clone(), s[..at].to_owned()));
                s = &s[at + l.len()..];
                i += 1;
            }
            (Part::Param(_), Some(Part::Param(_))) => return false,
        }
        i += 1;
    }
    s.is_empty()
}

/// One path template matched against one path the way the validator matches them (each
/// segment percent-decoded): the parameters, or `None`. For the fuzz targets and tests.
#[doc(hidden)]
pub fn match_path_template(template: &str, path: &str) -> Option<Vec<(String, String)>> {
    let segments = parse_template(template).ok()?;
    let trimmed = path.trim_matches('/');
    let segs: Vec<String> = if trimmed.is_empty() {
        Vec::new()
    } else {
        trimmed
            .split('/')
            .map(|s| percent_decode_path(s).into_owned())
            .collect()
    };
    if segments.len() != segs.len() {
        return None;
    }
    let mut params = Vec::new();
    segments
        .iter()
        .zip(&segs)
        .all(|(parts, s)| match_parts(parts, s, &mut params))
        .then_some(params)
}

/// Decodes `%XX` in a path segment (`+` stays a plus in paths).
pub(super) fn percent_decode_path(s: &str) -> std::borrow::Cow<'_, str> {
    if s.contains('+') {
        let protected = s.replace('+', "%2B");
        return std::borrow::Cow::Owned(percent_decode(&protected).into_owned());
    }
    percent_decode(s)
}
