//! Small helpers over `roxmltree` and the per-file classification context.

use std::collections::HashSet;

use roxmltree::{Node, NodeId};

use super::report::{Item, Status};

/// Element children of `n`.
pub fn kids<'a, 'i>(n: Node<'a, 'i>) -> impl Iterator<Item = Node<'a, 'i>> {
    n.children().filter(Node::is_element)
}

/// The first element child named `tag`.
pub fn child<'a, 'i>(n: Node<'a, 'i>, tag: &str) -> Option<Node<'a, 'i>> {
    kids(n).find(|c| c.tag_name().name() == tag)
}

/// All element children named `tag`.
pub fn all<'a, 'i>(n: Node<'a, 'i>, tag: &'a str) -> impl Iterator<Item = Node<'a, 'i>> + 'a
where
    'i: 'a,
{
    kids(n).filter(move |c| c.tag_name().name() == tag)
}

/// The text of `n` and its descendants, trimmed.
pub fn text(n: Node<'_, '_>) -> String {
    let mut s = String::new();
    for d in n.descendants().filter(Node::is_text) {
        s.push_str(d.text().unwrap_or_default());
    }
    s.trim().to_owned()
}

/// The trimmed text of child `tag`, when present and not empty.
pub fn child_text(n: Node<'_, '_>, tag: &str) -> Option<String> {
    child(n, tag).map(text).filter(|t| !t.is_empty())
}

pub fn attr(n: Node<'_, '_>, name: &str) -> Option<String> {
    n.attribute(name)
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

/// Apigee's booleans: `true` in any case.
pub fn truthy(s: &str) -> bool {
    s.trim().eq_ignore_ascii_case("true")
}

/// `Tag[name]` for elements with a `name` attribute, else `Tag`.
pub fn label(n: Node<'_, '_>) -> String {
    if n.tag_name().name() == "Step" {
        if let Some(name) = child_text(n, "Name") {
            return format!("Step[{name}]");
        }
    }
    match n.attribute("name") {
        Some(name) => format!("{}[{name}]", n.tag_name().name()),
        None => n.tag_name().name().to_owned(),
    }
}

/// The path of `n` from the document's root element: `Quota[Q-1]/Allow`.
pub fn path(n: Node<'_, '_>) -> String {
    let mut parts: Vec<String> = n.ancestors().filter(Node::is_element).map(label).collect();
    parts.reverse();
    parts.join("/")
}

/// Classifies the elements of one file: every element child of the root must be named in
/// an item by the end, or [`Classifier::finish`] reports it as not convertible.
pub struct Classifier {
    pub file: String,
    pub items: Vec<Item>,
    seen: HashSet<NodeId>,
    /// The worst status given so far.
    pub worst: Status,
}

impl Classifier {
    pub fn new(file: String) -> Self {
        Self {
            file,
            items: Vec::new(),
            seen: HashSet::new(),
            worst: Status::Converted,
        }
    }

    fn mark(&mut self, n: Node<'_, '_>) {
        for a in n.ancestors() {
            self.seen.insert(a.id());
        }
    }

    /// Marks `n` as handled without an item of its own (its children get them).
    pub fn touch(&mut self, n: Node<'_, '_>) {
        self.mark(n);
    }

    /// An item for `n` and everything below it.
    pub fn add(&mut self, n: Node<'_, '_>, status: Status, note: impl Into<String>) {
        self.mark(n);
        for d in n.descendants() {
            self.seen.insert(d.id());
        }
        self.worst = self.worst.max(status);
        self.items.push(Item {
            file: self.file.clone(),
            element: path(n),
            status,
            note: note.into(),
        });
    }

    pub fn ok(&mut self, n: Node<'_, '_>, note: impl Into<String>) {
        self.add(n, Status::Converted, note);
    }

    pub fn approx(&mut self, n: Node<'_, '_>, note: impl Into<String>) {
        self.add(n, Status::Approximated, note);
    }

    pub fn no(&mut self, n: Node<'_, '_>, why: impl Into<String>) {
        self.add(n, Status::NotConvertible, why);
    }

    /// An item about something other than an element (an attribute, a file).
    pub fn add_named(&mut self, element: String, status: Status, note: impl Into<String>) {
        self.worst = self.worst.max(status);
        self.items.push(Item {
            file: self.file.clone(),
            element,
            status,
            note: note.into(),
        });
    }

    /// Every element below `root` (any depth) not yet handled, reported not convertible:
    /// nothing is dropped without a word. `Description` / `DisplayName` are documentation.
    pub fn finish(&mut self, root: Node<'_, '_>, what: &str) {
        let pending: Vec<Node<'_, '_>> = root
            .descendants()
            .filter(|d| d.is_element() && d.id() != root.id() && !self.seen.contains(&d.id()))
            .filter(|d| {
                d.parent()
                    .is_some_and(|p| self.seen.contains(&p.id()) || p.id() == root.id())
            })
            .collect();
        for d in pending {
            if self.seen.contains(&d.id()) {
                continue;
            }
            match d.tag_name().name() {
                "Description" | "DisplayName" => self.ok(d, "documentation only"),
                other => self.no(
                    d,
                    format!("`{other}` is not an element of {what} the importer knows"),
                ),
            }
        }
    }
}
