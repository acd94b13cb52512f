//! kurz: a URL shortener built as a high-performance redirect front tier.
//!
//! The crate map, one line per module (see README.md, "Architecture", for how they fit):

pub mod datafile;
pub mod fsutil;
pub mod links;
pub mod store;
