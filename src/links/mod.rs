//! The rules of a link: what a valid long URL, alias and code are, and how codes are generated.
//! Pure functions over strings; never touches the store, a file or the network.

pub mod codegen;
pub mod validate;
