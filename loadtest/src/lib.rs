//! The load generator behind `kurz loadtest`. It knows nothing of the kurz server and can drive
//! any HTTP/1.1 server, so results for kurz, nginx and HAProxy are comparable side by side.
