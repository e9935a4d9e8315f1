-- The lines' states: per line {spent, reserved, limit in force ("" = none)}.
-- KEYS and ARGV as for reserve_spend.lua (the amount is unused).
local n = tonumber(ARGV[2])
local own = redis.call('HGET', KEYS[n + 1], ARGV[3])
local own_daily, own_monthly = "", ""
if own then own_daily, own_monthly = string.match(own, "^(%d*),(%d*)$") end
local out = {}
for i = 1, n do
  local base = 3 + (i - 1) * 3
  local limit = ARGV[base + 1]
  local which = ARGV[base + 2]
  if which == "daily" and own_daily and own_daily ~= "" then limit = own_daily end
  if which == "monthly" and own_monthly and own_monthly ~= "" then limit = own_monthly end
  local state = redis.call('HMGET', KEYS[i], 'spent', 'reserved')
  out[i] = {state[1] or "0", state[2] or "0", limit}
end
return out
