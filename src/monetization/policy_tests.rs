use super::*;
use crate::monetization::{Billing, EntryKind};
use crate::policies::llm_test_support as _support;

