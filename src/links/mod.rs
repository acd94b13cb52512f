//! The rules of a link: what a valid long URL, alias and code are, how codes are generated, and
//! when a link stops redirecting. Pure functions over strings and link meta; never touches the
//! store, a file or the network.

pub mod codegen;
pub mod lifecycle;
pub mod validate;
