-- Reserves ARGV[1] picodollars on every budget line, or on none.
-- KEYS[1..n]: the lines' counters (hashes: spent, reserved); KEYS[n+1]: the hash of callers' own
-- limits (field: caller, value: "DAILY,MONTHLY", either may be empty).
-- ARGV: amount, n, caller, then per line: limit ("" = none), which own limit replaces it
-- ("daily", "monthly" or ""), seconds to keep the counter.
-- Returns {1} when reserved, or {0, line index (0-based), spent, reserved, limit} when a line has
-- no room.
local amount = ARGV[1]
local n = tonumber(ARGV[2])
local limits = limits_in_force(n)
local states, full = lines_with_room(n, limits, amount)
if full then
  return {0, full - 1, states[full][1], states[full][2], limits[full]}
end
reserve_lines(n, amount)
return {1}
