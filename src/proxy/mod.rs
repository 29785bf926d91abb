//! Client traffic: `tcp` accepts and relays L4 connections through `pump`.

pub mod pump;
pub mod tcp;
