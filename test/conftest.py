"""Shared fixtures. Tests run against the package installed into the venv, never the sources."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
# In-process rclpy (a few tests) must stay on this machine too.
os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'


# Tests measured at more than ~2 s on 2 cores (training a real model, or driving a ROS graph
# across processes for seconds): `make check` leaves them out, `make test` runs them. Kept in
# one table (file -> test names, parameters included) so the fast loop's budget is one place
# to read; a test can also carry @pytest.mark.slow itself (test_memory, test_compare).
SLOW = {
    'test_bundle.py': {'test_every_step_of_a_save_leaves_a_loadable_bundle'},
    'test_carried_state.py': {
        'test_the_trainer_carries_each_lane_state_into_the_next_batch_and_trains_the_model'
    },
    'test_demo.py': {'test_train_one_tiny_epoch_then_drive_the_graph_for_a_few_seconds'},
    'test_launch.py': {'test_the_launch_command_line_by_hand_drives_from_the_camera_topic'},
    'test_latency.py': {
        'test_a_two_process_run_stamps_every_stage_in_order_and_the_report_agrees'
    },
    'test_model.py': {
        'test_trains_at_several_batch_sizes_and_lengths_then_predicts_at_any_length'
    },
    'test_motor_driver_node.py': {
        'test_a_second_ctrl_c_during_the_final_flush_still_releases_the_backend',
        'test_cmd_vel_is_mixed_onto_the_wheels_and_stops_after_cmd_timeout',
        'test_a_signal_stops_the_motors_and_exits_cleanly',
        'test_robot_yaml_with_a_sim_override_drives_with_its_values',
        'test_use_sim_time_without_clock_does_not_switch_the_watchdog_off',
    },
    'test_motorkit.py': {
        'test_after_a_kill_the_next_driver_and_motors_off_zero_the_hat',
        'test_the_driver_zeroes_at_start_drives_and_zeroes_then_releases_on_sigterm',
        'test_motors_off_follows_the_params_file_channels_and_says_what_failed',
    },
    'test_interventions.py': {'test_a_live_takeover_recorded_then_labelled_from_applied'},
    'test_supervisor.py': {
        'test_a_policy_that_only_turns_left_is_carried_round_a_lap_by_the_supervisor'
    },
    'test_takeover_node.py': {
        'test_teleop_takes_over_fast_and_hands_back_to_the_policy_after_teleop_timeout',
        'test_with_two_inputs_the_watchdog_stops_when_neither_is_fresh_and_applied_says_why',
    },
    'test_play.py': {
        'test_rate_1_every_message_in_order_with_the_recorded_timing_and_remap',
        'test_rate_2_plays_twice_as_fast_a_window_of_one_topic_from_sqlite3',
        'test_loop_repeats_the_bag_until_sigint_then_exits_cleanly',
        'test_no_subscriber_still_plays_after_the_wait',
        'test_bad_options_are_refused_before_anything_is_published',
    },
    'test_policy.py': {
        'test_reset_from_another_thread_leaves_the_state_whole',
        'test_the_seed_stateful_route_agrees_with_our_step_runtimes',
    },
    'test_policy_node.py': {
        'test_keras_backend_runs_and_agrees_with_the_offline_policy',
        'test_precision_int8_runs_the_exported_int8_model',
        'test_a_png_bomb_is_dropped_fast_and_small_and_a_slow_decode_is_not_stepped',
        'test_use_sim_time_ages_frames_on_clock_and_without_clock_steps_nothing',
        'test_compressed_frames_seeded_sampling_and_starting_disabled',
        'test_a_signal_publishes_a_zero_twist_and_exits_cleanly',
        'test_reset_on_handback_zeroes_the_state_when_the_takeover_ends',
    },
    'test_record.py': {
        'test_records_a_live_publisher_frame_for_frame_and_stops_cleanly_on_sigint',
        'test_sigterm_stops_it_like_ctrl_c',
        'test_a_full_disk_stops_the_recorder_with_one_line_and_a_readable_bag',
        'test_sigkill_mid_recording_then_recover_gives_back_the_messages',
        'test_duration_stops_by_itself_and_the_bag_is_valid',
        'test_record_splits_files_and_every_message_reads_back_in_order',
    },
    'test_replay_eval.py': {
        'test_sigint_during_a_realtime_replay_exits_cleanly_with_a_readable_run_bag',
        'test_lockstep_node_actions_equal_evaluate_on_every_frame',
        'test_missing_and_wrong_topics_are_named_before_anything_starts',
    },
    'test_sim_node.py': {
        'test_the_expert_behind_the_topics_drives_laps_through_the_motor_driver',
        'test_cmd_vel_input_moves_the_robot_stale_commands_stop_it_and_reset',
        'test_the_supervisor_takes_over_a_straying_policy_through_teleop_and_lets_go',
    },
    'test_stops.py': {'test_a_killed_process_under_sim_time_still_stops_the_wheels'},
    'test_train.py': {
        'test_train_writes_a_loadable_bundle_with_its_reports',
        'test_a_full_disk_while_saving_is_one_line_and_the_old_bundle_stays',
        'test_the_model_learns_what_is_in_the_data_and_stops_at_the_target',
        'test_a_failed_run_leaves_the_existing_bundle_untouched',
        'test_command_line_flags_override_the_config_file',
        'test_no_validation_split_trains_and_scores_on_training_windows',
    },
    'test_distribute.py': {
        'test_a_killed_run_resumes_from_its_backup_with_its_whole_history',
        'test_two_workers_on_loopback_write_one_bundle_and_a_killed_worker_costs_an_epoch',
        'test_mirrored_over_two_replicas_trains_both_recipes',
    },
    'test_window_policy.py': {
        'test_train_window_trains_on_k_frame_windows_and_evaluates_with_parity'
    },
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the tests of ``SLOW`` slow; a name in the table that matches no test is an error,
    so a renamed test cannot drop out of the table silently and slow down `make check`."""
    seen = set()
    for item in items:
        key = (item.path.name, getattr(item, 'originalname', item.name))
        if key[1] in SLOW.get(key[0], ()):
            item.add_marker(pytest.mark.slow)
            seen.add(key)
    collected = {item.path.name for item in items}
    missing = [
        f'{name}::{test}'
        for name, tests in SLOW.items()
        if name in collected
        for test in sorted(tests)
        if (name, test) not in seen
    ]
    whole_files = not any('::' in arg for arg in config.args)
    narrowed = config.getoption('keyword') or config.getoption('markexpr', '')
    if missing and whole_files and not narrowed:
        raise pytest.UsageError(f'conftest.SLOW names tests that do not exist: {missing}')


@pytest.fixture
def ros_env() -> dict[str, str]:
    """A child-process environment with a ROS_DOMAIN_ID of this test's own."""
    from support import ros_env as make_env

    return make_env()


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test an installed copy that is older than the sources (README "Tests")."""
    from support import REPO, SHARE_DIR, stale_install

    import malpi_ros

    for name, source, copy in (
        ('malpi_ros', REPO / 'malpi_ros', Path(malpi_ros.__file__).parent),
        ('launch', REPO / 'launch', SHARE_DIR / 'launch'),
    ):
        if not copy.is_dir():
            continue
        differ = stale_install(source, copy)
        if differ:
            more = f' and {len(differ) - 5} more' if len(differ) > 5 else ''
            shown = ', '.join(differ[:5]) + more
            pytest.exit(
                f'the installed {name} ({copy}) differs from the source tree: {shown}. '
                'Run `make build` (or `make check`) first.',
                returncode=4,
            )
