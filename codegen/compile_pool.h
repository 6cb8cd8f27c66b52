// Background compiles (KILN_BACKGROUND_COMPILE=1): worker threads that make kernels while the
// calls that asked for them run their groups' original ops, so a cold start compiles its kernels
// in parallel across the host's cores instead of one at a time on the calling thread.
//
// Note: the workers are joined when the process exits: a job in flight finishes first (LLVM's
// own statics must outlive it), jobs not yet started are dropped.
#pragma once

#include <functional>

namespace kiln {

// Runs `job` on a worker thread (one per core, at most 8).
void compileInBackground(std::function<void()> job);

// Blocks until every job submitted so far has run.
void waitForBackgroundCompiles();

}  // namespace kiln
