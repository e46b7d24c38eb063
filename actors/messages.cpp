// The one place every message type is announced to CAF (actors/messages.hpp).
#include "actors/messages.hpp"

namespace undertone::actors {

void register_message_types(caf::actor_system_config& cfg) {
#define UT_ADD(T) cfg.add_message_type<T>("undertone::" #T)
  UT_ADD(vad_settings);
  UT_ADD(sampling_settings);
  UT_ADD(session_settings);
  UT_ADD(open_session);
  UT_ADD(session_opened);
  UT_ADD(client_audio);
  UT_ADD(client_end_turn);
  UT_ADD(client_text_turn);
  UT_ADD(client_cancel);
  UT_ADD(client_config);
  UT_ADD(client_annotation);
  UT_ADD(client_gone);
  UT_ADD(to_client_delta);
  UT_ADD(turn_timings);
  UT_ADD(to_client_turn_end);
  UT_ADD(to_client_event);
  UT_ADD(to_client_error);
  UT_ADD(session_closed);
  UT_ADD(encode_open);
  UT_ADD(encode_audio);
  UT_ADD(encode_finish);
  UT_ADD(encode_close);
  UT_ADD(speech_rows);
  UT_ADD(llm_open);
  UT_ADD(llm_append);
  UT_ADD(llm_generate);
  UT_ADD(llm_cancel);
  UT_ADD(llm_truncate);
  UT_ADD(llm_close);
  UT_ADD(llm_delta);
  UT_ADD(llm_done);
  UT_ADD(llm_failed);
  UT_ADD(turn_record);
  UT_ADD(session_event);
  UT_ADD(subscribe_events);
  UT_ADD(unsubscribe_events);
  UT_ADD(inject_message);
  UT_ADD(component_restarted);
  UT_ADD(llm_mark);
  UT_ADD(llm_rewind);
  UT_ADD(finetune_now);
  UT_ADD(encoder_published);
  UT_ADD(finetune_status);
  UT_ADD(finetune_round_done);
  UT_ADD(swap_encoder);
  UT_ADD(rollback_encoder);
  UT_ADD(swap_result);
  UT_ADD(status_request);
  UT_ADD(encoder_status);
  UT_ADD(engine_status);
  UT_ADD(error_code);
#undef UT_ADD
}

}  // namespace undertone::actors
