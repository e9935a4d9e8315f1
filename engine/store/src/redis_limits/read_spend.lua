-- The lines' states: per line {spent, reserved, limit in force ("" = none)}.
-- KEYS and ARGV as for reserve_spend.lua (the amount is unused).
local n = tonumber(ARGV[2])
local limits = limits_in_force(n)
local out = {}
for i = 1, n do
  local limit = limits[i]
  local state = redis.call('HMGET', KEYS[i], 'spent', 'reserved')
  out[i] = {state[1] or "0", state[2] or "0", limit}
end
return out
