//! Apigee's condition language, for a step's `apigeeCondition`:
//! `request.verb = "POST" and proxy.pathsuffix MatchesPath "/v1/**"`.
//!
//! - Comparisons: `=` `==` `Equals` `Is`; `!=` `NotEquals` `IsNot`; `:=`
//!   `EqualsCaseInsensitive`; `>` `GreaterThan`; `>=` `GreaterThanOrEquals`; `<`
//!   `LesserThan`; `<=` `LesserThanOrEquals`; `=|` `StartsWith`; `~` `Matches` `Like` (glob,
//!   `*` any run of characters); `!~` (not `~`); `~/` `MatchesPath` `LikePath` (`*` any run
//!   within one path segment, `**` any run across segments, `%` escapes the next
//!   character); `~~` `JavaRegex` (the whole value must match). Word operators are
//!   case-insensitive and need spaces around them.
//! - `and` `&&`, `or` `||`, `not` `!`, parentheses; `and` binds tighter than `or` (Java's
//!   precedence, as Apigee documents); `not x = "a"` negates the comparison.
//! - The left side is a variable (`request.header.x-api-key`, or `'a!b'` in single quotes
//!   for a name holding an operator character; on the right side single quotes are
//!   refused, as a string meant in the wrong quotes); the right side a `"string"` (no escapes:
//!   a backslash is itself, as regular expressions want), a number (`12`, `3.5`, `10L`,
//!   `2.5f`), `true`, `false`, `null`, or a variable (not for the pattern operators). A
//!   variable alone is true when it holds `true`.
//! - Types as Apigee adapts them: two numbers compare as numbers, anything with a string
//!   compares as strings (`response.status.code = "404"` and `= 404` agree; a header
//!   `"10" > 9` compares the text `"10"` with `"9"`). String comparisons are
//!   case-sensitive except `:=`.
//! - Null (a variable that does not resolve, or `null`) follows Apigee's table: `=`, `:=`
//!   false unless both sides are null; `!=` true unless both are; `=|` false; `>` and `<`
//!   true when only the left is null; `>=` true when the right is null; `<=` true when the
//!   left is; `~`, `~~`, `~/` false; `!~` true when the left is null.
//!
//! Regular expressions are the `regex` crate's (linear time): Java's look-around,
//! back-references and possessive quantifiers are refused at load.

use std::borrow::Cow;
use std::cmp::Ordering;

use super::ExprError;
use crate::vars::{Exchange, Resolved};

/// Longest condition accepted.
const MAX_BYTES: usize = 4096;
/// Deepest nesting of parentheses and `not` accepted.
const MAX_DEPTH: usize = 64;

/// A compiled Apigee condition.
pub struct Condition {
    source: String,
    expr: Expr,
}

impl std::fmt::Debug for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ApigeeCondition")
            .field(&self.source)
            .finish()
    }
}

#[derive(Debug)]
enum Expr {
    Or(Vec<Expr>),
    And(Vec<Expr>),
    Not(Box<Expr>),
    Const(bool),
    /// A variable alone: true when it holds `true`.
    Truthy(String),
    Compare {
        var: String,
        op: Op,
        rhs: Operand,
    },
    Pattern {
        var: String,
        kind: PatternKind,
        re: regex::Regex,
    },
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Op {
    Eq,
    EqNoCase,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    StartsWith,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum PatternKind {
    Like,
    NotLike,
    Regex,
    Path,
}

#[derive(Debug)]
enum Operand {
    Var(String),
    Lit(Lit),
}

#[derive(Debug, Clone, PartialEq)]
enum Lit {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Null,
}

/// A value being compared.
#[derive(Debug)]
enum Val<'a> {
    Str(Cow<'a, str>),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl Val<'_> {
    fn text(&self) -> Cow<'_, str> {
        match self {
            Val::Str(s) => Cow::Borrowed(s),
            Val::Int(i) => Cow::Owned(i.to_string()),
            Val::Float(f) => Cow::Owned(java_double(*f)),
            Val::Bool(b) => Cow::Borrowed(if *b { "true" } else { "false" }),
        }
    }

    fn number(&self) -> f64 {
        match self {
            Val::Int(i) => *i as f64,
            Val::Float(f) => *f,
            Val::Bool(b) => f64::from(u8::from(*b)),
            Val::Str(_) => f64::NAN,
        }
    }

    fn int(&self) -> i64 {
        match self {
            Val::Int(i) => *i,
            Val::Bool(b) => i64::from(*b),
            _ => 0,
        }
    }
}

/// A double as Java's `Double.toString` writes the common ones (`3.0`, not `3`).
fn java_double(f: f64) -> String {
    if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e7 {
        format!("{f:.1}")
    } else {
        f.to_string()
    }
}

fn resolved(v: Resolved<'_>) -> Val<'_> {
    match v {
        Resolved::Text(s) => Val::Str(s),
        Resolved::Int(i) => Val::Int(i),
        Resolved::Float(f) => Val::Float(f),
        Resolved::Bool(b) => Val::Bool(b),
    }
}

impl Condition {
    /// Compiles `source`; a syntax error names the column where it was found.
    pub fn compile(source: &str) -> Result<Self, ExprError> {
        let refuse = |message: String| ExprError::Parse {
            source_text: source.to_owned(),
            message,
        };
        if source.len() > MAX_BYTES {
            return Err(refuse(format!("longer than {MAX_BYTES} bytes")));
        }
        let tokens = lex(source).map_err(|(at, m)| refuse(at_col(source, at, &m)))?;
        let mut p = Parser {
            tokens,
            pos: 0,
            depth: 0,
            end: source.len(),
        };
        let expr = p.or().map_err(|(at, m)| refuse(at_col(source, at, &m)))?;
        if let Some(t) = p.tokens.get(p.pos) {
            return Err(refuse(at_col(
                source,
                t.at,
                &format!("unexpected {}", t.kind.describe()),
            )));
        }
        Ok(Self {
            source: source.to_owned(),
            expr,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn eval(&self, ex: &Exchange) -> bool {
        eval(&self.expr, ex)
    }
}

fn at_col(source: &str, at: usize, message: &str) -> String {
    let col = source
        .get(..at)
        .map_or(at, |s| s.chars().count())
        .saturating_add(1);
    format!("{message} at column {col}")
}

fn eval(e: &Expr, ex: &Exchange) -> bool {
    match e {
        Expr::Or(es) => es.iter().any(|e| eval(e, ex)),
        Expr::And(es) => es.iter().all(|e| eval(e, ex)),
        Expr::Not(e) => !eval(e, ex),
        Expr::Const(b) => *b,
        Expr::Truthy(v) => match ex.resolve(v) {
            Some(Resolved::Bool(b)) => b,
            Some(Resolved::Text(s)) => s.trim().eq_ignore_ascii_case("true"),
            _ => false,
        },
        Expr::Compare { var, op, rhs } => {
            let l = ex.resolve(var).map(resolved);
            let r = match rhs {
                Operand::Var(v) => ex.resolve(v).map(resolved),
                Operand::Lit(Lit::Null) => None,
                Operand::Lit(Lit::Str(s)) => Some(Val::Str(Cow::Borrowed(s))),
                Operand::Lit(Lit::Int(i)) => Some(Val::Int(*i)),
                Operand::Lit(Lit::Float(f)) => Some(Val::Float(*f)),
                Operand::Lit(Lit::Bool(b)) => Some(Val::Bool(*b)),
            };
            match (l, r) {
                (Some(l), Some(r)) => compare(*op, &l, &r),
                (l, r) => null_rule(*op, l.is_none(), r.is_none()),
            }
        }
        Expr::Pattern { var, kind, re } => match ex.resolve(var).map(resolved) {
            None => *kind == PatternKind::NotLike,
            Some(v) => re.is_match(&v.text()) != (*kind == PatternKind::NotLike),
        },
    }
}

/// Apigee's table for a comparison with a null side.
fn null_rule(op: Op, left: bool, right: bool) -> bool {
    match (op, left, right) {
        (Op::Eq | Op::EqNoCase, l, r) => l && r,
        (Op::StartsWith, _, _) => false,
        (Op::Ne, l, r) => !(l && r),
        (Op::Gt | Op::Lt, l, r) => l && !r,
        (Op::Ge, _, r) => r,
        (Op::Le, l, _) => l,
    }
}

fn compare(op: Op, l: &Val<'_>, r: &Val<'_>) -> bool {
    let is_str = |v: &Val<'_>| matches!(v, Val::Str(_));
    let is_float = |v: &Val<'_>| matches!(v, Val::Float(_));
    let is_int = |v: &Val<'_>| matches!(v, Val::Int(_));
    if op == Op::StartsWith {
        return l.text().starts_with(r.text().as_ref());
    }
    let ordering = if is_str(l) || is_str(r) {
        let (a, b) = (l.text(), r.text());
        if op == Op::EqNoCase {
            return a.to_lowercase() == b.to_lowercase();
        }
        Some(a.as_ref().cmp(b.as_ref()))
    } else if is_float(l) || is_float(r) {
        l.number().partial_cmp(&r.number())
    } else if is_int(l) || is_int(r) {
        Some(l.int().cmp(&r.int()))
    } else {
        match (l, r) {
            (Val::Bool(a), Val::Bool(b)) => Some(a.cmp(b)),
            _ => None,
        }
    };
    let Some(o) = ordering else {
        return op == Op::Ne;
    };
    match op {
        Op::Eq | Op::EqNoCase => o == Ordering::Equal,
        Op::Ne => o != Ordering::Equal,
        Op::Gt => o == Ordering::Greater,
        Op::Ge => o != Ordering::Less,
        Op::Lt => o == Ordering::Less,
        Op::Le => o != Ordering::Greater,
        Op::StartsWith => false,
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// A bare word: a variable, a word operator, `and`/`or`/`not`, `true`/`false`/`null`.
    Word(String),
    /// A variable name in single quotes.
    QuotedVar(String),
    Str(String),
    Num(Lit),
    LParen,
    RParen,
    And,
    Or,
    Not,
    /// A symbol operator.
    Sym(&'static str),
}

impl Tok {
    fn describe(&self) -> String {
        match self {
            Tok::Word(w) => format!("`{w}`"),
            Tok::QuotedVar(v) => format!("`'{v}'`"),
            Tok::Str(s) => format!("string \"{s}\""),
            Tok::Num(_) => "number".into(),
            Tok::LParen => "`(`".into(),
            Tok::RParen => "`)`".into(),
            Tok::And => "`&&`".into(),
            Tok::Or => "`||`".into(),
            Tok::Not => "`!`".into(),
            Tok::Sym(s) => format!("`{s}`"),
        }
    }
}

#[derive(Debug)]
struct Token {
    kind: Tok,
    at: usize,
}

type ParseError = (usize, String);

/// Symbol operators, longest first where one is a prefix of another.
const SYMBOLS: &[&str] = &[
    "==", "=|", "!=", "!~", ":=", ">=", "<=", "~~", "~/", "=", ">", "<", "~",
];

fn is_word_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_'
}

fn is_word_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-')
}

fn lex(src: &str) -> Result<Vec<Token>, ParseError> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let at = i;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let kind = if c == b'"' || c == b'\'' {
            let end = src[i + 1..]
                .find(c as char)
                .ok_or((at, "unterminated quote".to_owned()))?;
            let text = src[i + 1..i + 1 + end].to_owned();
            i += end + 2;
            if c == b'"' {
                Tok::Str(text)
            } else {
                Tok::QuotedVar(text)
            }
        } else if c.is_ascii_digit()
            || (matches!(c, b'-' | b'.') && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            let start = i;
            i += 1;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            let digits = &src[start..i];
            let suffix = b.get(i).copied().filter(|s| b"fFdDlL".contains(s));
            if suffix.is_some() {
                i += 1;
            }
            let lit = match suffix {
                Some(b'l' | b'L') => digits.parse().ok().map(Lit::Int),
                Some(_) => digits.parse().ok().map(Lit::Float),
                None if digits.contains('.') => digits.parse().ok().map(Lit::Float),
                None => digits.parse().ok().map(Lit::Int),
            }
            .ok_or((at, format!("`{}` is not a number", &src[start..i])))?;
            if b.get(i).is_some_and(|&c| is_word_char(c)) {
                return Err((at, format!("`{}…` is not a number", &src[start..=i])));
            }
            Tok::Num(lit)
        } else if is_word_start(c) {
            let start = i;
            while i < b.len() && is_word_char(b[i]) {
                i += 1;
            }
            Tok::Word(src[start..i].to_owned())
        } else if c == b'(' {
            i += 1;
            Tok::LParen
        } else if c == b')' {
            i += 1;
            Tok::RParen
        } else if src[i..].starts_with("&&") {
            i += 2;
            Tok::And
        } else if src[i..].starts_with("||") {
            i += 2;
            Tok::Or
        } else if let Some(s) = SYMBOLS.iter().find(|s| src[i..].starts_with(**s)) {
            i += s.len();
            Tok::Sym(s)
        } else if c == b'!' {
            i += 1;
            Tok::Not
        } else {
            let ch = src[i..].chars().next().unwrap_or('?');
            return Err((at, format!("unexpected character `{ch}`")));
        };
        out.push(Token { kind, at });
    }
    Ok(out)
}

/// The operator a symbol or word stands for.
enum AnyOp {
    Cmp(Op),
    Pat(PatternKind),
}

fn operator(t: &Tok) -> Option<AnyOp> {
    use AnyOp::{Cmp, Pat};
    Some(match t {
        Tok::Sym(s) => match *s {
            "=" | "==" => Cmp(Op::Eq),
            "!=" => Cmp(Op::Ne),
            ":=" => Cmp(Op::EqNoCase),
            ">" => Cmp(Op::Gt),
            ">=" => Cmp(Op::Ge),
            "<" => Cmp(Op::Lt),
            "<=" => Cmp(Op::Le),
            "=|" => Cmp(Op::StartsWith),
            "~" => Pat(PatternKind::Like),
            "!~" => Pat(PatternKind::NotLike),
            "~~" => Pat(PatternKind::Regex),
            "~/" => Pat(PatternKind::Path),
            _ => return None,
        },
        Tok::Word(w) => match w.to_ascii_lowercase().as_str() {
            "equals" | "is" => Cmp(Op::Eq),
            "notequals" | "isnot" => Cmp(Op::Ne),
            "equalscaseinsensitive" => Cmp(Op::EqNoCase),
            "greaterthan" => Cmp(Op::Gt),
            "greaterthanorequals" => Cmp(Op::Ge),
            "lesserthan" => Cmp(Op::Lt),
            "lesserthanorequals" => Cmp(Op::Le),
            "startswith" => Cmp(Op::StartsWith),
            "matches" | "like" => Pat(PatternKind::Like),
            "javaregex" => Pat(PatternKind::Regex),
            "matchespath" | "likepath" => Pat(PatternKind::Path),
            _ => return None,
        },
        _ => return None,
    })
}

fn is_word(t: &Tok, word: &str) -> bool {
    matches!(t, Tok::Word(w) if w.eq_ignore_ascii_case(word))
}

struct Parser {
    tokens: Vec<Token>,
    pos: usize,
    depth: usize,
    /// Where the source ends, for errors at its end.
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.tokens.get(self.pos).map(|t| &t.kind)
    }

    fn at(&self) -> usize {
        self.tokens.get(self.pos).map_or(self.end, |t| t.at)
    }

    fn or(&mut self) -> Result<Expr, ParseError> {
        let mut terms = vec![self.and()?];
        while self
            .peek()
            .is_some_and(|t| *t == Tok::Or || is_word(t, "or"))
        {
            self.pos += 1;
            terms.push(self.and()?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::Or(terms)
        })
    }

    fn and(&mut self) -> Result<Expr, ParseError> {
        let mut terms = vec![self.unary()?];
        while self
            .peek()
            .is_some_and(|t| *t == Tok::And || is_word(t, "and"))
        {
            self.pos += 1;
            terms.push(self.unary()?);
        }
        Ok(if terms.len() == 1 {
            terms.remove(0)
        } else {
            Expr::And(terms)
        })
    }

    fn deeper(&mut self) -> Result<(), ParseError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err((self.at(), format!("nested deeper than {MAX_DEPTH} levels")));
        }
        Ok(())
    }

    fn unary(&mut self) -> Result<Expr, ParseError> {
        if self
            .peek()
            .is_some_and(|t| *t == Tok::Not || is_word(t, "not"))
        {
            self.pos += 1;
            self.deeper()?;
            let e = self.unary()?;
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(e)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, ParseError> {
        let at = self.at();
        let Some(t) = self.peek().cloned() else {
            return Err((at, "expected a comparison".into()));
        };
        self.pos += 1;
        let var = match t {
            Tok::LParen => {
                self.deeper()?;
                let e = self.or()?;
                self.depth -= 1;
                if self.peek() != Some(&Tok::RParen) {
                    return Err((self.at(), "expected `)`".into()));
                }
                self.pos += 1;
                return Ok(e);
            }
            Tok::Word(w) if w.eq_ignore_ascii_case("true") => return Ok(Expr::Const(true)),
            Tok::Word(w) if w.eq_ignore_ascii_case("false") => return Ok(Expr::Const(false)),
            Tok::Word(w)
                if operator(&Tok::Word(w.clone())).is_none()
                    && !["and", "or", "not", "null"]
                        .iter()
                        .any(|k| w.eq_ignore_ascii_case(k)) =>
            {
                w
            }
            Tok::QuotedVar(v) => v,
            other => {
                return Err((
                    at,
                    format!(
                        "expected a variable, `(` or `not`, found {}",
                        other.describe()
                    ),
                ))
            }
        };
        let Some(op) = self.peek().and_then(operator) else {
            return Ok(Expr::Truthy(var));
        };
        self.pos += 1;
        let rhs_at = self.at();
        let rhs = self.tokens.get(self.pos).map(|t| t.kind.clone());
        self.pos += 1;
        match op {
            AnyOp::Pat(kind) => {
                let Some(Tok::Str(p)) = rhs else {
                    return Err((rhs_at, "expected a \"pattern\" in double quotes".into()));
                };
                let re = pattern(kind, &p).map_err(|m| (rhs_at, m))?;
                Ok(Expr::Pattern { var, kind, re })
            }
            AnyOp::Cmp(op) => {
                let rhs = match rhs {
                    Some(Tok::Str(s)) => Operand::Lit(Lit::Str(s)),
                    Some(Tok::Num(n)) => Operand::Lit(n),
                    Some(Tok::Word(w)) if w.eq_ignore_ascii_case("null") => Operand::Lit(Lit::Null),
                    Some(Tok::Word(w)) if w.eq_ignore_ascii_case("true") => {
                        Operand::Lit(Lit::Bool(true))
                    }
                    Some(Tok::Word(w)) if w.eq_ignore_ascii_case("false") => {
                        Operand::Lit(Lit::Bool(false))
                    }
                    Some(Tok::Word(w))
                        if operator(&Tok::Word(w.clone())).is_none()
                            && !["and", "or", "not"]
                                .iter()
                                .any(|k| w.eq_ignore_ascii_case(k)) =>
                    {
                        Operand::Var(w)
                    }
                    // `'POST'` would be a variable named POST, null, and the comparison
                    // silently false: refused, as the likely mistake it is.
                    Some(Tok::QuotedVar(v)) => {
                        return Err((
                            rhs_at,
                            format!(
                                "'{v}' in single quotes is a variable name in Apigee's \
                                 conditions; write a string in double quotes: \"{v}\""
                            ),
                        ))
                    }
                    other => {
                        return Err((
                            rhs_at,
                            format!(
                                "expected a value after the operator, found {}",
                                other.map_or("the end".into(), |t| t.describe())
                            ),
                        ))
                    }
                };
                Ok(Expr::Compare { var, op, rhs })
            }
        }
    }
}

/// Compiles a `~` / `!~` glob, a `~/` path pattern or a `~~` regular expression, all
/// matching the whole value.
fn pattern(kind: PatternKind, p: &str) -> Result<regex::Regex, String> {
    let body = match kind {
        PatternKind::Regex => p.to_owned(),
        PatternKind::Like | PatternKind::NotLike => p
            .split('*')
            .map(regex::escape)
            .collect::<Vec<_>>()
            .join(".*"),
        PatternKind::Path => {
            let mut out = String::new();
            let mut chars = p.chars().peekable();
            while let Some(c) = chars.next() {
                match c {
                    '%' => {
                        if let Some(n) = chars.next() {
                            out.push_str(&regex::escape(&n.to_string()));
                        }
                    }
                    '*' if chars.peek() == Some(&'*') => {
                        chars.next();
                        out.push_str(".*");
                    }
                    '*' => out.push_str("[^/]*"),
                    c => out.push_str(&regex::escape(&c.to_string())),
                }
            }
            out
        }
    };
    // Java's `.` stops at a newline in a regular expression; a glob's `*` does not.
    let flags = if kind == PatternKind::Regex {
        ""
    } else {
        "(?s)"
    };
    regex::Regex::new(&format!("{flags}^(?:{body})$")).map_err(|e| match kind {
        PatternKind::Regex => format!(
            "JavaRegex \"{p}\": {e} (Java's look-around, back-references and possessive \
             quantifiers are not supported)"
        ),
        _ => format!("pattern \"{p}\": {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vars::{Headers, RequestInfo, ResponseInfo};

    fn ex() -> Exchange {
        let mut h = Headers::new();
        h.push(":method".into(), "POST".into());
        h.push(":path".into(), "/v1/chat/completions?model=gpt&n=10".into());
        h.push(":authority".into(), "api.local".into());
        h.push("x-tier".into(), "Gold".into());
        h.push("x-count".into(), "10".into());
        h.push("x-empty".into(), "".into());
        let mut ex = Exchange {
            flow: "chat".into(),
            request: RequestInfo::from_headers(h),
            ..Default::default()
        };
        ex.response = Some(ResponseInfo {
            status: 404,
            headers: Headers::new(),
        });
        ex.set_var("flag", "true");
        ex.set_var("off", false);
        ex.set_var("on", true);
        ex.set_var("ratio", crate::vars::Value::Float(2.5));
        ex.set_var("used", 7);
        ex.set_var("tier.copy", "Gold");
        ex.set_var("a!b", "weird");
        ex.set_var("text", "line1\nline2");
        ex
    }

    fn t(src: &str) -> bool {
        Condition::compile(src)
            .unwrap_or_else(|e| panic!("{src}: {e}"))
            .eval(&ex())
    }

    fn err(src: &str) -> String {
        Condition::compile(src)
            .err()
            .unwrap_or_else(|| panic!("`{src}` compiled"))
            .to_string()
    }

    #[test]
    fn equality_and_case() {
        for (src, want) in [
            (r#"request.verb = "POST""#, true),
            (r#"request.verb == "POST""#, true),
            (r#"request.verb Equals "POST""#, true),
            (r#"request.verb equals "POST""#, true),
            (r#"request.verb is "POST""#, true),
            (r#"request.verb="POST""#, true),
            (r#"request.verb = "post""#, false),
            (r#"request.verb := "post""#, true),
            (r#"request.verb EqualsCaseInsensitive "pOsT""#, true),
            (r#"request.verb != "GET""#, true),
            (r#"request.verb NotEquals "POST""#, false),
            (r#"request.verb IsNot "GET""#, true),
            (r#"request.header.x-tier = tier.copy"#, true),
            (r#"request.header.X-Tier = "Gold""#, true),
            (r#"request.queryparam.model = "gpt""#, true),
            (r#"'a!b' = "weird""#, true),
            (r#"request.header.x-empty = """#, true),
        ] {
            assert_eq!(t(src), want, "{src}");
        }
    }

    #[test]
    fn numbers_and_types_adapt_as_apigee_documents() {
        for (src, want) in [
            ("response.status.code = 404", true),
            (r#"response.status.code = "404""#, true),
            ("response.status.code >= 400", true),
            ("response.status.code GreaterThan 404", false),
            ("response.status.code < 500", true),
            ("response.status.code LesserThanOrEquals 404", true),
            ("used > 6", true),
            ("used GreaterThanOrEquals 8", false),
            ("used = 7L", true),
            ("used < 7.5", true),
            ("ratio > 2", true),
            ("ratio = 2.5f", true),
            ("ratio < -1", false),
            // A header is text: compared with a number as text ("10" before "9").
            ("request.header.x-count > 9", false),
            ("request.header.x-count = 10", true),
            ("on = true", true),
            ("off = false", true),
            ("off = true", false),
            (r#"flag = "true""#, true),
            ("flag = true", true),
        ] {
            assert_eq!(t(src), want, "{src}");
        }
    }

    #[test]
    fn patterns() {
        for (src, want) in [
            (r#"request.path Like "/v1/*""#, true),
            (r#"request.path ~ "*chat*""#, true),
            (r#"request.path Matches "/v1/chat""#, false),
            (r#"request.path Like "/V1/*""#, false),
            (r#"request.path !~ "/v2/*""#, true),
            (r#"request.path StartsWith "/v1/""#, true),
            (r#"request.path =| "/v2""#, false),
            (r#"request.path MatchesPath "/v1/**""#, true),
            (r#"request.path ~/ "/v1/*""#, false),
            (r#"request.path ~/ "/v1/*/completions""#, true),
            (r#"request.path LikePath "/*/chat/*""#, true),
            (r#"request.path MatchesPath "/v1""#, false),
            (r#"request.path MatchesPath "/**/completions""#, true),
            (
                r#"request.path MatchesPath "/v1/chat/completions/**""#,
                false,
            ),
            (r#"request.uri MatchesPath "/v1/**%?model=*""#, true),
            (r#"request.path JavaRegex "/v1/[a-z]+/completions""#, true),
            // The whole value must match.
            (r#"request.path ~~ "/v1/[a-z]+""#, false),
            (r#"request.path ~~ "(?i)/V1/.*""#, true),
            (r#"request.path ~~ "/v1/\w+/\w+""#, true),
            (r#"text ~~ "line1.line2""#, false),
            (r#"text ~ "line1*""#, true),
            (r#"used ~~ "\d""#, true),
        ] {
            assert_eq!(t(src), want, "{src}");
        }
        let e = err(r#"request.path ~~ "(?<=v)1""#);
        assert!(e.contains("look-around"), "{e}");
        let e = err(r#"request.path ~~ "(a)\1""#);
        assert!(e.contains("JavaRegex"), "{e}");
        let e = err("request.path Like request.uri");
        assert!(e.contains("in double quotes"), "{e}");
    }

    /// Apigee's table for null operands (a variable that does not resolve, or `null`).
    #[test]
    fn null_operands_follow_apigees_table() {
        // (operator, left null, right null, both null)
        for (op, l, r, both) in [
            ("=", false, false, true),
            ("==", false, false, true),
            (":=", false, false, true),
            ("=|", false, false, false),
            ("!=", true, true, false),
            (">", true, false, false),
            (">=", false, true, true),
            ("<", true, false, false),
            ("<=", true, false, true),
        ] {
            assert_eq!(t(&format!(r#"missing {op} "x""#)), l, "left null {op}");
            assert_eq!(t(&format!("request.verb {op} null")), r, "right null {op}");
            assert_eq!(
                t(&format!("request.verb {op} missing")),
                r,
                "right var null {op}"
            );
            assert_eq!(t(&format!("missing {op} null")), both, "both null {op}");
        }
        for (op, l) in [("~", false), ("~~", false), ("~/", false), ("!~", true)] {
            assert_eq!(t(&format!(r#"missing {op} ".*""#)), l, "left null {op}");
        }
        assert!(t("request.header.x-nope is null"));
        assert!(!t("request.header.x-tier is null"));
        assert!(t("request.header.x-tier IsNot null"));
        // An empty header is a value, not null.
        assert!(!t("request.header.x-empty = null"));
        assert!(t("not missing = \"x\""));
    }

    #[test]
    fn logic_precedence_and_truthiness() {
        for (src, want) in [
            (
                r#"request.verb = "POST" and request.path MatchesPath "/v1/**""#,
                true,
            ),
            (
                r#"request.verb = "GET" && request.path MatchesPath "/v1/**""#,
                false,
            ),
            (r#"request.verb = "GET" or request.path ~/ "/v1/**""#, true),
            (r#"request.verb = "GET" || missing = "x""#, false),
            // `and` binds tighter: true or (false and false).
            (
                r#"request.verb = "POST" or request.verb = "GET" and missing = "x""#,
                true,
            ),
            (
                r#"(request.verb = "POST" or request.verb = "GET") and missing = "x""#,
                false,
            ),
            (r#"not request.verb = "POST""#, false),
            (r#"NOT (request.verb = "GET")"#, true),
            (r#"!(request.verb = "GET") AND !missing"#, true),
            (r#"!!(request.verb = "POST")"#, true),
            ("flag", true),
            ("on", true),
            ("off", false),
            ("missing", false),
            ("!flag", false),
            ("not off", true),
            ("used", false),
            ("true", true),
            ("false or on", true),
            (r#"((((request.verb = "POST"))))"#, true),
            // Without a basePath the suffix is the whole path.
            (
                r#"(proxy.pathsuffix MatchesPath "/v1/**") and (request.verb = "POST")"#,
                true,
            ),
            (r#"proxy.pathsuffix MatchesPath "/chat/**""#, false),
        ] {
            assert_eq!(t(src), want, "{src}");
        }
    }

    #[test]
    fn syntax_errors_name_the_column() {
        for (src, want) in [
            (
                r#"request.verb = "#,
                "expected a value after the operator, found the end at column 16",
            ),
            (
                r#"request.verb "POST""#,
                "unexpected string \"POST\" at column 14",
            ),
            (r#"(request.verb = "POST""#, "expected `)` at column 23"),
            (r#"request.verb = "POST"#, "unterminated quote at column 16"),
            (
                r#"request.verb = "a" and"#,
                "expected a comparison at column 23",
            ),
            (r#""POST" = request.verb"#, "expected a variable"),
            (
                "request.verb = and",
                "expected a value after the operator, found `and`",
            ),
            ("a = 12abc", "is not a number"),
            ("a # b", "unexpected character `#` at column 3"),
            ("", "expected a comparison at column 1"),
            (
                "request.verb = 'POST'",
                "write a string in double quotes: \"POST\" at column 16",
            ),
            (r#"a = "x") "#, "unexpected `)` at column 8"),
        ] {
            let e = err(src);
            assert!(e.contains(want), "{src}: {e}");
        }
        let deep = format!("{}a{}", "(".repeat(100), ")".repeat(100));
        assert!(err(&deep).contains("nested deeper"));
        assert!(err(&"not ".repeat(100)).contains("nested deeper"));
        assert!(err(&"a or ".repeat(1000)).contains("longer than"));
        // A long flat chain is fine: it is not nested.
        let chain = vec![r#"a = "x""#; 300].join(" or ");
        assert!(!Condition::compile(&chain).unwrap().eval(&ex()));
    }

    /// Token soup from the characters and words the lexer reacts to: compiling and
    /// evaluating never panic.
    #[test]
    fn odd_conditions_never_panic() {
        const PIECES: &[&str] = &[
            "(",
            ")",
            "\"",
            "'",
            " ",
            "=",
            "!",
            "~",
            "/",
            "|",
            "&",
            ">",
            "<",
            ":",
            "*",
            "-",
            ".",
            "5",
            "1.5",
            "7L",
            "and",
            "or",
            "not",
            "null",
            "true",
            "Like",
            "MatchesPath",
            "JavaRegex",
            "request.verb",
            "used",
            "missing",
            "\"/v1/**\"",
            "\"[\"",
            "é",
            "💥",
            "\u{0}",
            "%",
            "\\",
        ];
        let ex = ex();
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut x = seed;
            let mut s = String::new();
            for _ in 0..(seed % 16) {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                s.push_str(PIECES[(x >> 33) as usize % PIECES.len()]);
            }
            if let Ok(c) = Condition::compile(&s) {
                let _ = c.eval(&ex);
            }
        }
    }
}
