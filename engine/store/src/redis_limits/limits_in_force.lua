-- Prepended to reserve_spend.lua, read_spend.lua and admit.lua, so that what a read shows as the limit is the
-- limit a reservation enforces: per line the configured limit ("" = none), replaced by the
-- caller's own daily or monthly limit where one is set.
-- KEYS[n+1]: the hash of callers' own limits (field: caller, value: "DAILY,MONTHLY").
-- ARGV: amount, n, caller, then per line: limit, which own limit replaces it, seconds to keep it.
local function limits_in_force(n)
  local own = redis.call('HGET', KEYS[n + 1], ARGV[3])
  local own_daily, own_monthly = "", ""
  if own then own_daily, own_monthly = string.match(own, "^(%d*),(%d*)$") end
  local limits = {}
  for i = 1, n do
    local base = 3 + (i - 1) * 3
    local limit = ARGV[base + 1]
    local which = ARGV[base + 2]
    if which == "daily" and own_daily and own_daily ~= "" then limit = own_daily end
    if which == "monthly" and own_monthly and own_monthly ~= "" then limit = own_monthly end
    limits[i] = limit
  end
  return limits
end
