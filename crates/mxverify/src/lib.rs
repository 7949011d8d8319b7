//! mxverify as a library: the parts of the command-line program that can be tested alone.

pub mod commands;
pub mod demo;
pub mod output;
pub mod qr_image;
pub mod qr_tool;
