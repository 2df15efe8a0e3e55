-- wrk script: every request carries a different client address in X-Forwarded-For.
--
--   wrk ... -s xff.lua URL -- KEYS [START [BASE]]
--
-- Addresses are 100.64.0.0 + (n mod KEYS) written as a dotted quad (shared address space,
-- never a trusted proxy in the benchmark; room for up to 4194304 distinct keys), with n counting
-- the requests of this wrk thread from START (default 0); threads start at different offsets so
-- that they do not send the same sequence. BASE replaces 100.64.0.0 (as a 32-bit number).

local keys = 1000000
local base = 100 * 16777216 + 64 * 65536
local n = 0
local next_index = 0

function setup(thread)
    thread:set("thread_index", next_index)
    next_index = next_index + 1
end

function init(args)
    local start = 0
    if args[1] then keys = tonumber(args[1]) end
    if args[2] then start = tonumber(args[2]) end
    if args[3] then base = tonumber(args[3]) end
    -- thread_index is the global that setup() gave this thread's state.
    local index = tonumber(rawget(_G, "thread_index")) or 0
    -- Spread the threads over the key space.
    n = start + math.floor(index * keys / 16)
end

local function quad(v)
    local a = math.floor(v / 16777216) % 256
    local b = math.floor(v / 65536) % 256
    local c = math.floor(v / 256) % 256
    local d = v % 256
    return string.format("%d.%d.%d.%d", a, b, c, d)
end

function request()
    local addr = quad(base + (n % keys))
    n = n + 1
    return wrk.format("GET", "/", {["X-Forwarded-For"] = addr})
end
