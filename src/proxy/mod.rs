//! Client traffic: `tcp` accepts (every mode) and relays L4 connections through
//! `pump`; `http` serves L7 frontends over `upstream` connections, with
//! `h1guard` checking HTTP/1 request heads first.

pub mod h1guard;
pub mod http;
pub mod pump;
pub mod tcp;
pub mod upstream;
