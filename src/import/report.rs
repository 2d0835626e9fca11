//! The import report: every element of the bundle, classified.

use serde::Serialize;

/// How one element carried over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Status {
    /// Same behaviour in tollgate.
    Converted,
    /// Carried over with a difference the note describes.
    Approximated,
    /// Not carried over; the note says why. Steps of such policies fail closed.
    NotConvertible,
}

impl Status {
    pub fn word(self) -> &'static str {
        match self {
            Status::Converted => "converted",
            Status::Approximated => "approximated",
            Status::NotConvertible => "not convertible",
        }
    }
}

/// One classified element.
#[derive(Debug, Clone, Serialize)]
pub struct Item {
    /// The bundle file (`apiproxy/policies/VA-Key.xml`).
    pub file: String,
    /// The element, as a path from the file's root element
    /// (`VerifyAPIKey[VA-Key]/APIKey`).
    pub element: String,
    pub status: Status,
    /// What it became, how it differs, or why it could not be converted.
    pub note: String,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Counts {
    pub converted: usize,
    pub approximated: usize,
    pub not_convertible: usize,
}

/// The whole report of one bundle.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub bundle: String,
    pub kind: super::bundle::Kind,
    pub name: String,
    /// The worst status of any element: the bundle's classification.
    pub outcome: Status,
    pub counts: Counts,
    pub elements: Vec<Item>,
    /// Files written (or that would be written with `--check`), relative to OUT_DIR.
    pub outputs: Vec<String>,
}

impl Report {
    pub fn new(
        bundle: String,
        kind: super::bundle::Kind,
        name: String,
        elements: Vec<Item>,
        outputs: Vec<String>,
    ) -> Self {
        let mut counts = Counts::default();
        for i in &elements {
            match i.status {
                Status::Converted => counts.converted += 1,
                Status::Approximated => counts.approximated += 1,
                Status::NotConvertible => counts.not_convertible += 1,
            }
        }
        let outcome = elements
            .iter()
            .map(|i| i.status)
            .max()
            .unwrap_or(Status::Converted);
        Self {
            bundle,
            kind,
            name,
            outcome,
            counts,
            elements,
            outputs,
        }
    }

    /// The elements not converted, as `file: element`.
    pub fn not_convertible(&self) -> impl Iterator<Item = &Item> {
        self.elements
            .iter()
            .filter(|i| i.status == Status::NotConvertible)
    }

    /// The human-readable form: a summary, then not-convertible, approximated and converted
    /// elements (in that order: what needs attention first).
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let c = &self.counts;
        let _ = writeln!(
            s,
            "tollgate import: {} `{}` ({}): {}",
            self.kind.root(),
            self.name,
            self.bundle,
            self.outcome.word()
        );
        let _ = writeln!(
            s,
            "  {} elements: {} converted, {} approximated, {} not convertible",
            self.elements.len(),
            c.converted,
            c.approximated,
            c.not_convertible
        );
        for status in [
            Status::NotConvertible,
            Status::Approximated,
            Status::Converted,
        ] {
            let items: Vec<&Item> = self
                .elements
                .iter()
                .filter(|i| i.status == status)
                .collect();
            if items.is_empty() {
                continue;
            }
            let _ = writeln!(s, "\n{}:", status.word().to_uppercase());
            for i in items {
                let _ = writeln!(s, "  {}: {}", i.file, i.element);
                let _ = writeln!(s, "      {}", i.note);
            }
        }
        if !self.outputs.is_empty() {
            let _ = writeln!(s, "\nOUTPUT: {}", self.outputs.join(", "));
        }
        s
    }
}
