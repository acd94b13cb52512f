//! kurz: a URL shortener built as a high-performance redirect front tier.
//!
//! The crate map, one line per module (see README.md, "Architecture", for how they fit):

pub mod analytics;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod datafile;
pub mod fsutil;
pub mod http;
pub mod links;
pub mod metrics;
pub mod store;
