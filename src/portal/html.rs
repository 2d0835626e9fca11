//! HTML building blocks: escaping (every piece of user or configuration text goes through
//! [`esc`]), the page frame with its inline style, and the usage chart as inline SVG.

use std::fmt::{self, Write};

/// Text escaped for HTML element content and double-quoted attribute values.
pub struct Esc<'a>(pub &'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        let mut last = 0;
        for (i, b) in s.bytes().enumerate() {
            let rep = match b {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                b'\'' => "&#39;",
                _ => continue,
            };
            f.write_str(&s[last..i])?;
            f.write_str(rep)?;
            last = i + 1;
        }
        f.write_str(&s[last..])
    }
}

pub fn esc(s: &str) -> Esc<'_> {
    Esc(s)
}

/// A path segment percent-encoded for a URL inside an `href` (then HTML-escaped too).
pub fn url_seg(s: &str) -> String {
    crate::kvm::encode_path_segment(s)
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:0;color:#1b1f24;background:#f6f7f9}\
header{background:#1f3a5f;color:#fff;padding:.6em 1.2em;display:flex;gap:1.2em;align-items:center}\
header a{color:#fff;text-decoration:none}header form{margin:0 0 0 auto}\
main{max-width:72em;margin:1.2em auto;padding:0 1.2em}\
.card{background:#fff;border:1px solid #d8dde3;border-radius:6px;padding:1em;margin:.8em 0}\
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #e3e6ea;padding:.3em .5em;text-align:left;vertical-align:top}\
code,pre{background:#eef1f4;border-radius:3px;padding:.1em .3em;font-size:.92em}pre{padding:.6em;overflow:auto;white-space:pre-wrap}\
.tag{display:inline-block;border-radius:3px;padding:0 .4em;font-size:.85em;background:#e3ecf7}\
.get{background:#d9f2e3}.post{background:#fde7c8}.put{background:#e1e1fb}.delete{background:#f8d5d5}\
.pending{color:#9a5b00}.revoked{color:#b00020}.approved{color:#17692f}\
.flash{background:#fff7d6;border:1px solid #e6d48a;padding:.6em;border-radius:4px}\
.error{background:#fde2e2;border:1px solid #e59a9a;padding:.6em;border-radius:4px}\
input,select,button{font:inherit;padding:.25em .4em}label{display:block;margin:.4em 0}\
.slot{border:1px dashed #9aa5b1;color:#59636e}";

/// The frame every page shares. `title` and `signed_in` are escaped here; `body` is HTML
/// built from escaped parts. `csrf` is the session's token for the sign-out form.
pub fn page(title: &str, signed_in: Option<(&str, &str)>, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 2048);
    let _ = write!(
        out,
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
<title>{} · developer portal</title><style>{STYLE}</style></head><body><header>\
<strong><a href=\"/\">API portal</a></strong><a href=\"/\">Catalog</a>",
        esc(title)
    );
    match signed_in {
        Some((email, csrf)) => {
            let _ = write!(
                out,
                "<a href=\"/apps\">My apps</a><form method=\"post\" action=\"/signout\">\
<span>{}</span> <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
<button type=\"submit\">Sign out</button></form>",
                esc(email),
                esc(csrf)
            );
        }
        None => out.push_str(
            "<span style=\"margin-left:auto\"><a href=\"/signin\">Sign in</a> · <a href=\"/signup\">Sign up</a></span>",
        ),
    }
    out.push_str("</header><main>");
    out.push_str(body);
    out.push_str("</main></body></html>");
    out
}

/// One series of a bar chart: hour labels and values.
pub struct Bars<'a> {
    pub title: &'a str,
    pub labels: Vec<String>,
    pub values: Vec<i64>,
}

/// A bar chart as inline SVG (no script, no external asset). Labels are escaped.
pub fn bar_chart(c: &Bars<'_>) -> String {
    let (w, h, pad) = (720.0_f64, 220.0_f64, 34.0_f64);
    let max = c.values.iter().copied().max().unwrap_or(0).max(1) as f64;
    let n = c.values.len().max(1) as f64;
    let bw = (w - pad * 2.0) / n;
    let mut s = String::with_capacity(256 + c.values.len() * 160);
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" role=\"img\" class=\"chart\" viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\">\
<title>{}</title><rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"#fff\"/>\
<line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/>\
<text x=\"4\" y=\"{}\" font-size=\"11\">{}</text><text x=\"4\" y=\"{}\" font-size=\"11\">0</text>",
        esc(c.title),
        h - pad,
        w - pad,
        h - pad,
        pad - 6.0,
        max as i64,
        h - pad + 4.0
    );
    for (i, v) in c.values.iter().enumerate() {
        let bh = (*v as f64 / max) * (h - pad * 2.0);
        let x = pad + i as f64 * bw;
        let label = c.labels.get(i).map(String::as_str).unwrap_or("");
        let _ = write!(
            s,
            "<rect class=\"bar\" x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#3d7cc9\" data-value=\"{v}\"><title>{}: {v}</title></rect>",
            x + 1.0,
            h - pad - bh,
            (bw - 2.0).max(1.0),
            bh,
            esc(label)
        );
        if i.is_multiple_of(4) {
            let _ = write!(
                s,
                "<text x=\"{:.1}\" y=\"{}\" font-size=\"10\">{}</text>",
                x,
                h - pad + 14.0,
                esc(label)
            );
        }
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(
            esc("<script>alert('x')</script>&\"").to_string(),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
        assert_eq!(esc("plain é").to_string(), "plain é");
    }

    #[test]
    fn chart_has_a_bar_per_value_and_escapes_labels() {
        let svg = bar_chart(&Bars {
            title: "<t>",
            labels: vec!["<a>".into(), "b".into()],
            values: vec![3, 0],
        });
        assert_eq!(svg.matches("class=\"bar\"").count(), 2);
        assert!(svg.contains("data-value=\"3\""));
        assert!(!svg.contains("<a>") && !svg.contains("<t>"));
    }

    #[test]
    fn page_escapes_title_and_user() {
        let p = page("<x>", Some(("<e>", "\"c")), "");
        assert!(!p.contains("<x>") && !p.contains("<e>") && !p.contains("\"c\""));
    }
}
