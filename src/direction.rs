//! Which half of an exchange something belongs to. Its own module so `vars`, `expr` and
//! `pipeline` can all name it without importing each other.

/// Which half of the exchange a step belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    Request,
    Response,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Request => "request",
            Direction::Response => "response",
        }
    }
}
