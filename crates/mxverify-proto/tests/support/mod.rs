pub mod schema;
pub mod net;
