//! `idc`: the operations tool of idempotent-consumer (feature `cli`). See
//! `idempotent_consumer::ops` and the README's section "Operating a service".

fn main() -> std::process::ExitCode {
    idempotent_consumer::ops::main()
}
