pub mod net;
pub mod schema;
