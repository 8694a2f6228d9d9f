// Umbrella header: everything a host program (a training stack, the CLI) needs from ringattn.
#pragma once

#include "ringattn/backend.hpp"
#include "ringattn/error.hpp"
#include "ringattn/layout.hpp"
#include "ringattn/ring_attention.hpp"
#include "ringattn/spec.hpp"
#include "ringattn/tensor.hpp"
#include "ringattn/transport.hpp"
