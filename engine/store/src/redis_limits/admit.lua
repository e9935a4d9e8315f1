-- Admits a request in one step: takes one request from the caller's limit, then reserves the
-- first call's worst case on every budget line, then one request and its tokens of its
-- provider's per-minute budgets. A refusal stops there: nothing after it is taken, and a
-- provider refusal takes no dollars either.
-- KEYS[1..n]: budget lines; KEYS[n+1]: callers' own limits; KEYS[n+2]: the caller's bucket;
-- KEYS[n+3], KEYS[n+4]: the provider's request and token buckets.
-- ARGV: as reserve_spend.lua (amount, n, caller, three per line), then from b = 3 + 3n:
-- b+1 "1" to take from the caller's bucket, b+2 µs per cell, b+3 burst;
-- b+4 "1" to reserve from the provider, b+5 µs per request, b+6 requests burst, b+7 µs per
-- token, b+8 tokens burst, b+9 tokens to reserve.
-- Returns {0, µs to wait} when the caller is limited;
-- {1, remaining, µs until full, line index (0-based), spent, reserved, limit} when a budget has
-- no room; otherwise {2, remaining, µs until full, provider (1 reserved, 0 refused, -1 not
-- asked), µs to wait, which provider bucket refused (1 requests, 2 tokens), then per line spent,
-- reserved, limit as they were before}. remaining and µs until full are -1 when the caller's
-- bucket was not asked.
local amount = ARGV[1]
local n = tonumber(ARGV[2])
local b = 3 + 3 * n

local remaining, full_in = -1, -1
if ARGV[b + 1] == "1" then
  local every = tonumber(ARGV[b + 2])
  local burst = tonumber(ARGV[b + 3])
  local tat, wait = probe(KEYS[n + 2], every, burst, 1)
  if wait > 0 then return {0, wait} end
  store_tat(KEYS[n + 2], tat)
  remaining = math.floor((now + every * burst - tat) / every)
  full_in = tat - now
end

local limits, states = {}, {}
if n > 0 then
  limits = limits_in_force(n)
  local full
  states, full = lines_with_room(n, limits, amount)
  if full then
    return {1, remaining, full_in, full - 1, states[full][1], states[full][2], limits[full]}
  end
end

local provider, p_wait, p_which = -1, 0, 0
if ARGV[b + 4] == "1" then
  local r_tat, r_wait = probe(KEYS[n + 3], tonumber(ARGV[b + 5]), tonumber(ARGV[b + 6]), 1)
  local t_tat, t_wait = probe(KEYS[n + 4], tonumber(ARGV[b + 7]), tonumber(ARGV[b + 8]), tonumber(ARGV[b + 9]))
  if r_wait > 0 then
    provider, p_wait, p_which = 0, r_wait, 1
  elseif t_wait > 0 then
    provider, p_wait, p_which = 0, t_wait, 2
  else
    provider = 1
    store_tat(KEYS[n + 3], r_tat)
    store_tat(KEYS[n + 4], t_tat)
  end
end

if provider ~= 0 and n > 0 then reserve_lines(n, amount) end
local out = {2, remaining, full_in, provider, p_wait, p_which}
for i = 1, n do
  out[#out + 1] = states[i][1]
  out[#out + 1] = states[i][2]
  out[#out + 1] = limits[i]
end
return out
