// Shared by the pipeline-level parity ops (sd_pipeline, sega_pipeline).
#pragma once

#include <memory>

#include "model_folder.h"
#include "parity.h"
#include "scheduler.h"

namespace fairdiff::parity {

// The case's model folder, loaded once per run in the run's dtype and device.
StableDiffusionModel& model_for(const ParityCase& c);

// The scheduler the case recorded: its class and full config.
std::unique_ptr<Scheduler> scheduler_for(const ParityCase& c);

}  // namespace fairdiff::parity
