-- Argo CD health check for modelfleet.io/InferenceModel (resource.customizations.health.modelfleet.io_InferenceModel).
-- It reads the same conditions as kstatus (Flux, kpt, Helm 4), so both tools agree:
--   deleting                                   -> Progressing (Argo CD's own rule for objects being deleted)
--   no status / observedGeneration behind spec -> Progressing (the operator has not seen this generation yet)
--   Stalled=True                               -> Degraded    (cannot go live without a change; the previous
--                                                              version may still serve: see the Serving condition)
--   Reconciling=True                           -> Progressing (building or rolling out the current generation)
--   Ready=True for this generation             -> Healthy
--   anything else                              -> Progressing
local function condition(status, name)
  for _, c in ipairs(status.conditions or {}) do
    if c.type == name then
      return c
    end
  end
  return nil
end

local function describe(c)
  return (c.reason or "") .. ": " .. (c.message or "")
end

local function health(o)
  local meta = o.metadata or {}
  if meta.deletionTimestamp ~= nil then
    return { status = "Progressing", message = "Pending deletion" }
  end
  local status = o.status
  if status == nil or status.observedGeneration == nil or status.observedGeneration == 0 then
    return { status = "Progressing", message = "Waiting for the operator to reconcile this model" }
  end
  local generation = meta.generation
  if generation ~= nil and status.observedGeneration ~= generation then
    return {
      status = "Progressing",
      message = "Generation " .. generation .. " not observed yet (status is for " .. status.observedGeneration .. ")",
    }
  end
  local stalled = condition(status, "Stalled")
  if stalled ~= nil and stalled.status == "True" then
    return { status = "Degraded", message = describe(stalled) }
  end
  local reconciling = condition(status, "Reconciling")
  if reconciling ~= nil and reconciling.status == "True" then
    return { status = "Progressing", message = describe(reconciling) }
  end
  local ready = condition(status, "Ready")
  if ready ~= nil and ready.status == "True" and (ready.observedGeneration == nil or ready.observedGeneration == generation) then
    return { status = "Healthy", message = ready.message or "" }
  end
  if ready ~= nil then
    return { status = "Progressing", message = describe(ready) }
  end
  return { status = "Progressing", message = "Waiting for the Ready condition" }
end

return health(obj)
