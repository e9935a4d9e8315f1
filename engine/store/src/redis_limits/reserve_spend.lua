-- Reserves ARGV[1] picodollars on every budget line, or on none.
-- KEYS[1..n]: the lines' counters (hashes: spent, reserved); KEYS[n+1]: the hash of callers' own
-- limits (field: caller, value: "DAILY,MONTHLY", either may be empty).
-- ARGV: amount, n, caller, then per line: limit ("" = none), which own limit replaces it
-- ("daily", "monthly" or ""), seconds to keep the counter.
-- Returns {1} when reserved, or {0, line index (0-based), spent, reserved, limit} when a line has
-- no room.
-- Amounts pass as decimal strings and are compared as (millions, remainder) pairs: Lua numbers
-- are doubles, exact only to 2^53 picodollars (about $9,000), and budgets may be larger.
local B = 1000000
local function split(s)
  s = tostring(s or "0")
  if s == "" or string.sub(s, 1, 1) == "-" then return 0, 0 end
  local n = #s
  if n <= 6 then return 0, tonumber(s) end
  return tonumber(string.sub(s, 1, n - 6)), tonumber(string.sub(s, n - 5))
end
local function add(ah, al, bh, bl)
  local l = al + bl
  return ah + bh + math.floor(l / B), l % B
end
local function greater(ah, al, bh, bl)
  return ah > bh or (ah == bh and al > bl)
end
local amount = ARGV[1]
local n = tonumber(ARGV[2])
local limits = limits_in_force(n)
for i = 1, n do
  local limit = limits[i]
  if limit ~= "" then
    local state = redis.call('HMGET', KEYS[i], 'spent', 'reserved')
    local sh, sl = split(state[1])
    local rh, rl = split(state[2])
    local ah, al = split(amount)
    local th, tl = add(sh, sl, rh, rl)
    th, tl = add(th, tl, ah, al)
    local lh, ll = split(limit)
    if greater(th, tl, lh, ll) then
      return {0, i - 1, state[1] or "0", state[2] or "0", limit}
    end
  end
end
for i = 1, n do
  local base = 3 + (i - 1) * 3
  redis.call('HINCRBY', KEYS[i], 'reserved', amount)
  redis.call('EXPIRE', KEYS[i], ARGV[base + 3])
end
return {1}
