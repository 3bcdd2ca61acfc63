//! Hostile and careless input (one test binary): every class of failure issue 16 found —
//! pickles that nest, amplify or over-reach, special files and escaping names, corrupt streamed
//! merge headers and merge configs, ReFT positions and loads, unbounded configs, torn or
//! colliding saves, and the replay of the fuzzers' regression inputs. Each test failed (a
//! panic, an abort, a hang, a silent wrong result) before the fix it guards.

#[path = "../common/mod.rs"]
mod common;

mod configs;
mod files;
mod merge;
mod pickle;
mod reft;
mod saves;
